# Prototype of the training head on deeprank's own cached pooled features (bench/RESULTS.md §3,
# session 7): how the classes head was found before it was built in Rust. Not product code.
# Make the two DBs first (raw features of the selection split, bench/split_mini.sh):
#   deeprank embed --data $S/fit --out db-lite0-224-fit --size 224 --no-normalize --labels folders
#   deeprank embed --data $S/sel --out db-lite0-224-sel --size 224 --no-normalize --labels folders
# then e.g.  python bench/head_prototype.py db-lite0-224 --input both --pth LITE0.pth --alpha 16
# (--loss semihard|proxy|proxy+semihard, --input pooled|sqrtsm|both, --flip PREFIX [--tta]).
import os, numpy as np, torch
def load_db(d):
    V = np.load(os.path.join(d, "vectors.npy"))
    rows = [l.rstrip("\n").split("\t") for l in open(os.path.join(d, "manifest.tsv"))][1:]
    return np.asarray(V, dtype=np.float32), np.array([r[2] for r in rows])
def load(pre):
    F, fl = load_db(pre + "-fit"); S, sl = load_db(pre + "-sel"); return F, fl, S, sl
def l2n(x): return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
def metrics(Q, ql, D, dl):
    Q = torch.from_numpy(np.ascontiguousarray(Q)); D = torch.from_numpy(np.ascontiguousarray(D))
    d2 = (Q*Q).sum(1, keepdim=True) - 2*Q@D.T + (D*D).sum(1)[None]
    idx = torch.topk(d2, 100, dim=1, largest=False).indices.numpy()
    rel = (dl[idx] == ql[:, None])
    R = np.array([(dl == l).sum() for l in ql])
    ap = []
    for i in range(len(ql)):
        r = min(R[i], 100); h = rel[i, :r]
        ap.append((np.cumsum(h) / np.arange(1, r+1) * h).sum() / r)
    return {"P@1": round(float(rel[:, 0].mean()), 4), "P@30": round(float(rel[:, :30].mean()), 4), "MAP@R": round(float(np.mean(ap)), 4)}
# Prototype heads on cached pooled features (fit -> DB/train, sel -> queries). Not product code.
import sys, json, os, time, numpy as np, torch
torch.set_num_threads(1)
import argparse
ap = argparse.ArgumentParser()
ap.add_argument("pre"); ap.add_argument("--loss", default="semihard"); ap.add_argument("--epochs", type=int, default=15)
ap.add_argument("--dim", type=int, default=128); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--gap", type=float, default=1.0); ap.add_argument("--scale", type=float, default=16.0)
ap.add_argument("--input", default="pooled"); ap.add_argument("--pth", default="")
ap.add_argument("--hidden", type=int, default=0); ap.add_argument("--wd", type=float, default=0.0)
ap.add_argument("--mix", type=float, default=1.0); ap.add_argument("--alpha", type=float, default=8.0); ap.add_argument("--temp", type=float, default=1.0); ap.add_argument("--evalpre", action="store_true"); ap.add_argument("--flip", default=""); ap.add_argument("--tta", action="store_true"); ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
torch.manual_seed(a.seed); np.random.seed(a.seed)
F, fl, S, sl = load(a.pre)
if a.flip:
    F2, _, S2, _ = load(a.flip)
    if a.tta: S = (S + S2) / 2
if a.input != "pooled":
    sd = torch.load(a.pth, map_location="cpu"); W = sd["_fc.weight"].numpy(); b = sd["_fc.bias"].numpy()
    LF, LS = F @ W.T + b, S @ W.T + b
    def lsm(L): z = L - L.max(1, keepdims=True); return z - np.log(np.exp(z).sum(1, keepdims=True))
    if a.input == "sqrtsm": F, S = np.sqrt(np.exp(lsm(LF))), np.sqrt(np.exp(lsm(LS)))
    if a.input == "both" and a.flip:
        L2 = F2 @ W.T + b; F2 = np.hstack([F2, a.alpha*np.sqrt(np.exp(lsm(L2/a.temp)))])
    if a.input == "both": F, S = np.hstack([F, a.alpha*np.sqrt(np.exp(lsm(LF/a.temp)))]), np.hstack([S, a.alpha*np.sqrt(np.exp(lsm(LS/a.temp)))])
if a.evalpre: print("pre", metrics(l2n(S), sl, l2n(F), fl), flush=True)
classes = sorted(set(fl)); ci = {c: i for i, c in enumerate(classes)}
y = np.array([ci[c] for c in fl])
X2 = torch.from_numpy(F2.astype(np.float32)) if a.flip else None
X = torch.from_numpy(F.astype(np.float32)); Xs = torch.from_numpy(S.astype(np.float32)); Y = torch.from_numpy(y)
d_in = X.shape[1]
layers = [torch.nn.Linear(d_in, a.hidden), torch.nn.ReLU(), torch.nn.Linear(a.hidden, a.dim)] if a.hidden else [torch.nn.Linear(d_in, a.dim)]
head = torch.nn.Sequential(*layers)
proxies = torch.nn.Parameter(torch.randn(len(classes), a.dim) * 0.1)
params = list(head.parameters()) + ([proxies] if "proxy" in a.loss else [])
opt = torch.optim.Adam(params, lr=a.lr, eps=1e-8, weight_decay=a.wd)
by_class = [np.where(y == c)[0] for c in range(len(classes))]
P, K = 32, 4; steps = len(y) // (P * K)
def embed(x): return torch.nn.functional.normalize(head(x), dim=1)
def semihard(e, lab):
    d = torch.cdist(e, e)
    same = lab[:, None] == lab[None]; eye = torch.eye(len(lab), dtype=torch.bool)
    losses = []
    ap_mask = same & ~eye
    a_i, p_i = torch.where(ap_mask)
    dap = d[a_i, p_i]
    dn = d[a_i]  # rows
    neg = ~same[a_i]
    big = torch.full_like(dn, 1e9)
    farther = torch.where(neg & (dn > dap[:, None]), dn, big).min(1).values
    hardest = torch.where(neg, dn, big).min(1).values
    dan = torch.where(farther < 1e9, farther, hardest)
    return torch.relu(a.gap + dap - dan).mean()
def proxy(e, lab):
    logits = a.scale * e @ torch.nn.functional.normalize(proxies, dim=1).T
    return torch.nn.functional.cross_entropy(logits, lab)
t0 = time.time()
for ep in range(1, a.epochs + 1):
    for s in range(steps):
        cls = np.random.choice(len(classes), P, replace=False)
        idx = np.concatenate([np.random.choice(by_class[c], K, replace=False) for c in cls])
        xb = X[idx]
        if a.flip:
            m = torch.rand(len(idx)) < 0.5; xb = torch.where(m[:, None], X2[idx], xb)
        e = embed(xb); lab = Y[idx]
        if a.loss == "semihard": loss = semihard(e, lab)
        elif a.loss == "proxy": loss = proxy(e, lab)
        elif a.loss == "proxy+semihard": loss = proxy(e, lab) + a.mix * semihard(e, lab)
        opt.zero_grad(); loss.backward(); opt.step()
    if ep in (1, 5, 10) or ep == a.epochs:
        with torch.no_grad(): ed, eq = (embed((X + X2) / 2) if a.tta else embed(X)).numpy(), embed(Xs).numpy()
        print(ep, round(time.time() - t0, 1), metrics(eq, sl, ed, fl), flush=True)
