//! The ranking layer: `l = max(0, g + D(f(q), f(p)) − D(f(q), f(n)))` with D Euclidean, and the
//! in-batch triplet mining of Hermans et al. 2017 (batch-hard, semi-hard).

use burn::prelude::*;
use burn::tensor::activation::relu;

/// Squared distances are clamped here before the square root (its gradient at 0 is infinite).
const EPS: f32 = 1e-12;

/// Row-wise Euclidean distance `D(a[i], b[i])`: `[n]`.
pub fn row_dist(a: Tensor<2>, b: Tensor<2>) -> Tensor<1> {
    let [n, _] = a.dims();
    (a - b)
        .square()
        .sum_dim(1)
        .clamp_min(EPS)
        .sqrt()
        .reshape([n])
}

/// All pairwise Euclidean distances of the rows of `x`: `[n, n]`.
pub fn pairwise_dist(x: Tensor<2>) -> Tensor<2> {
    let [n, _] = x.dims();
    let sq = x.clone().square().sum_dim(1);
    let gram = crate::model::device::matmul(x.clone(), x.transpose());
    (sq.clone().expand([n, n]) + sq.transpose().expand([n, n]) - gram.mul_scalar(2.0))
        .clamp_min(EPS)
        .sqrt()
}

/// The ranking loss averaged over triplets, given `D(q,p)` and `D(q,n)`.
pub fn ranking_loss(d_qp: Tensor<1>, d_qn: Tensor<1>, gap: f32) -> Tensor<1> {
    relu(d_qp - d_qn + gap).mean()
}

/// Plain-number version of the ranking loss for one triplet (tests, reports).
pub fn ranking_loss_value(d_qp: f32, d_qn: f32, gap: f32) -> f32 {
    (gap + d_qp - d_qn).max(0.0)
}

/// A mined triplet: anchor, positive, negative rows of a batch.
pub type Mined = (usize, usize, usize);

/// Batch-hard: for every anchor with a positive and a negative in the batch, its farthest positive
/// and nearest negative. `d` is the `n×n` distance matrix, row-major.
pub fn mine_batch_hard(d: &[f32], labels: &[usize]) -> Vec<Mined> {
    let n = labels.len();
    assert_eq!(d.len(), n * n);
    let mut out = Vec::with_capacity(n);
    for a in 0..n {
        let row = &d[a * n..(a + 1) * n];
        let mut pos: Option<(usize, f32)> = None;
        let mut neg: Option<(usize, f32)> = None;
        for (j, &dj) in row.iter().enumerate() {
            if j == a {
                continue;
            }
            if labels[j] == labels[a] {
                if pos.is_none_or(|(_, b)| dj > b) {
                    pos = Some((j, dj));
                }
            } else if neg.is_none_or(|(_, b)| dj < b) {
                neg = Some((j, dj));
            }
        }
        if let (Some((p, _)), Some((q, _))) = (pos, neg) {
            out.push((a, p, q));
        }
    }
    out
}

/// Semi-hard: for every anchor–positive pair, the nearest negative that is farther than the
/// positive (FaceNet's semi-hard negative); when no negative is farther, the nearest negative.
pub fn mine_semi_hard(d: &[f32], labels: &[usize]) -> Vec<Mined> {
    let n = labels.len();
    assert_eq!(d.len(), n * n);
    let mut out = Vec::new();
    for a in 0..n {
        let row = &d[a * n..(a + 1) * n];
        let negs: Vec<usize> = (0..n).filter(|&j| labels[j] != labels[a]).collect();
        if negs.is_empty() {
            continue;
        }
        let hardest = *negs
            .iter()
            .min_by(|&&x, &&y| row[x].total_cmp(&row[y]))
            .expect("non-empty");
        for p in (0..n).filter(|&j| j != a && labels[j] == labels[a]) {
            let semi = negs
                .iter()
                .copied()
                .filter(|&j| row[j] > row[p])
                .min_by(|&x, &y| row[x].total_cmp(&row[y]));
            out.push((a, p, semi.unwrap_or(hardest)));
        }
    }
    out
}

/// Loss over mined triplets, gathered from the (differentiable) distance matrix. Returns the loss
/// and the share of mined triplets already ranked right (`D(a,p) < D(a,n)`).
pub fn mined_loss(dist: Tensor<2>, d_host: &[f32], mined: &[Mined], gap: f32) -> (Tensor<1>, f32) {
    let [n, _] = dist.dims();
    let device = dist.device();
    let flat = dist.reshape([n * n]);
    let ap: Vec<i64> = mined.iter().map(|&(a, p, _)| (a * n + p) as i64).collect();
    let an: Vec<i64> = mined.iter().map(|&(a, _, q)| (a * n + q) as i64).collect();
    let m = mined.len();
    let ap = Tensor::<1, Int>::from_data(TensorData::new(ap, [m]), &device);
    let an = Tensor::<1, Int>::from_data(TensorData::new(an, [m]), &device);
    let d_ap = flat.clone().select(0, ap);
    let d_an = flat.select(0, an);
    let right = mined
        .iter()
        .filter(|&&(a, p, q)| d_host[a * n + p] < d_host[a * n + q])
        .count();
    (
        ranking_loss(d_ap, d_an, gap),
        right as f32 / m.max(1) as f32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> Device {
        Device::flex()
    }

    fn t2(v: Vec<f32>, r: usize, c: usize) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v, [r, c]), &dev())
    }

    fn val(t: Tensor<1>) -> f32 {
        t.into_data().try_to_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn ranking_loss_by_hand() {
        // q=(0,0), p=(3,4): D=5; n=(6,8): D=10. Loss = max(0, 1 + 5 - 10) = 0 (zero-loss case).
        let q = t2(vec![0.0, 0.0], 1, 2);
        let p = t2(vec![3.0, 4.0], 1, 2);
        let n = t2(vec![6.0, 8.0], 1, 2);
        let (dqp, dqn) = (
            row_dist(q.clone(), p.clone()),
            row_dist(q.clone(), n.clone()),
        );
        assert!((val(dqp.clone()) - 5.0).abs() < 1e-5);
        assert_eq!(val(ranking_loss(dqp.clone(), dqn.clone(), 1.0)), 0.0);
        // Margin case: with g = 6, loss = 6 + 5 - 10 = 1.
        assert!((val(ranking_loss(dqp.clone(), dqn.clone(), 6.0)) - 1.0).abs() < 1e-5);
        // Positive farther than negative: loss = 1 + 10 - 5 = 6 (swap roles).
        assert!((val(ranking_loss(dqn, dqp, 1.0)) - 6.0).abs() < 1e-5);
        assert_eq!(ranking_loss_value(5.0, 10.0, 1.0), 0.0);
        assert_eq!(ranking_loss_value(5.0, 5.5, 1.0), 0.5);
    }

    #[test]
    fn mean_over_a_batch_and_gradient_direction() {
        let d = Device::flex().autodiff();
        let q = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 0.0, 0.0, 0.0], [2, 2]), &d)
            .require_grad();
        let p = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 0.0, 0.0, 2.0], [2, 2]), &d);
        let n = Tensor::<2>::from_data(TensorData::new(vec![3.0f32, 0.0, 1.0, 0.0], [2, 2]), &d);
        // Triplet 1: 1 + 1 - 3 = -1 -> 0. Triplet 2: 1 + 2 - 1 = 2. Mean = 1.
        let loss = ranking_loss(row_dist(q.clone(), p), row_dist(q.clone(), n), 1.0);
        assert!((loss.clone().into_scalar::<f32>() - 1.0).abs() < 1e-5);
        let g = loss.backward();
        let gq = q.grad(&g).unwrap().into_data().try_to_vec::<f32>().unwrap();
        // Only triplet 2 contributes: ½ [(q−p)/D(q,p) − (q−n)/D(q,n)] = ½ [(0,−1) − (−1,0)].
        assert_eq!(&gq[..2], &[0.0, 0.0]);
        assert!(
            (gq[2] - 0.5).abs() < 1e-5 && (gq[3] + 0.5).abs() < 1e-5,
            "{gq:?}"
        );
    }

    #[test]
    fn pairwise_matches_row_dist() {
        let x = t2(vec![0.0, 0.0, 3.0, 4.0, 1.0, 1.0], 3, 2);
        let d = pairwise_dist(x).into_data().try_to_vec::<f32>().unwrap();
        assert!((d[1] - 5.0).abs() < 1e-4 && (d[3] - 5.0).abs() < 1e-4);
        assert!((d[2] - 2f32.sqrt()).abs() < 1e-4);
        assert!(d[0] < 1e-5);
    }

    /// Points on a line: labels a a a b b at positions 0, 1, 5, 2, 9.
    fn line() -> (Vec<f32>, Vec<usize>) {
        let x = [0.0f32, 1.0, 5.0, 2.0, 9.0];
        let labels = vec![0, 0, 0, 1, 1];
        let d = x
            .iter()
            .flat_map(|a| x.iter().map(move |b| (a - b).abs()))
            .collect();
        (d, labels)
    }

    #[test]
    fn batch_hard_picks_farthest_positive_and_nearest_negative() {
        let (d, l) = line();
        let m = mine_batch_hard(&d, &l);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0], (0, 2, 3)); // anchor 0: farthest positive at 5, nearest negative at 2
        assert_eq!(m[1], (1, 2, 3));
        assert_eq!(m[2], (2, 0, 3)); // anchor 5: positives 0 (d5), 1 (d4); negatives 2 (d3), 9 (d4)
        assert_eq!(m[3], (3, 4, 1)); // anchor 2 (class b): positive 9; nearest negative 1
        assert_eq!(m[4], (4, 3, 2));
    }

    #[test]
    fn semi_hard_picks_nearest_negative_beyond_the_positive() {
        let (d, l) = line();
        let m = mine_semi_hard(&d, &l);
        // Anchor 0 with positive 1 (d=1): negatives at d 2 and 9 -> nearest farther = 3 (d=2).
        assert!(m.contains(&(0, 1, 3)));
        // Anchor 0 with positive 2 (d=5): farther negative only 4 (d=9).
        assert!(m.contains(&(0, 2, 4)));
        // Anchor 2 (x=5) with positive 0 (d=5): no negative farther than 5 -> hardest (3, d=3).
        assert!(m.contains(&(2, 0, 3)));
        // Every anchor-positive pair appears once: 3*2 + 2*1 = 8.
        assert_eq!(m.len(), 8);
    }

    #[test]
    fn mined_loss_gathers_the_right_entries() {
        let (d, l) = line();
        let dist = t2(d.clone(), 5, 5);
        let m = mine_batch_hard(&d, &l);
        let (loss, acc) = mined_loss(dist, &d, &m, 1.0);
        let want: f32 = m
            .iter()
            .map(|&(a, p, q)| ranking_loss_value(d[a * 5 + p], d[a * 5 + q], 1.0))
            .sum::<f32>()
            / m.len() as f32;
        assert!((val(loss) - want).abs() < 1e-5);
        let right = m
            .iter()
            .filter(|&&(a, p, q)| d[a * 5 + p] < d[a * 5 + q])
            .count();
        assert!((acc - right as f32 / 5.0).abs() < 1e-6);
    }
}
