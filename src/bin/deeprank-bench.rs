//! `deeprank-bench`: the measurements `bench/*.sh` compare with their anchors (PyTorch, FAISS,
//! PIL), kept out of the user-facing `deeprank` command. Each prints one `RESULT …` line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use deeprank::data::collection::{Collection, Labels};
use deeprank::data::dataset::{Dataset, Split};
use deeprank::{benchkit, train};
use globals::Globals;
use std::path::{Path, PathBuf};

#[path = "../cli/globals.rs"]
mod globals;

#[derive(Parser)]
#[command(
    name = "deeprank-bench",
    version,
    about = "deeprank's benchmarks (bench/*.sh runs them)"
)]
struct Cli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Builds a set with planted near-duplicates (bench/duplicates.sh): ORIGINALS images spread
    /// evenly over a folder, and copies of the first PLANTED of them (see benchkit::PLANT_KINDS).
    Plant {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 500)]
        originals: usize,
        #[arg(long, default_value_t = 100)]
        planted: usize,
        #[arg(long, default_value = "half,double,jpeg50,crop90,flip")]
        kinds: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Times exact search over random vectors (bench/search.sh compares it with FAISS).
    Search {
        #[arg(long, default_value = "/tmp/deeprank-bench/search")]
        dir: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        n: usize,
        #[arg(long, default_value_t = 128)]
        dim: usize,
        #[arg(long, default_value_t = 1)]
        queries: usize,
        #[arg(long, default_value_t = 10)]
        k: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Times deeprank's HNSW index (the code `deeprank index` ships) against the exact scan:
    /// build seconds, index bytes, then recall@K and queries/s per --ef, all queries in one call,
    /// on a pool of --threads threads (default 2). Both files are `[rows, dim]` little-endian f32 C-order `.npy`
    /// (numpy `np.save` of a float32 2-d array; any header version).
    Ann {
        #[arg(long)]
        db_npy: PathBuf,
        /// The queries; without it, the last --nq rows of --db-npy are the queries (left out of the
        /// index).
        #[arg(long)]
        queries: Option<PathBuf>,
        #[arg(long, default_value_t = 1000)]
        nq: usize,
        #[arg(long, default_value_t = 16)]
        m: usize,
        #[arg(long, default_value_t = 200)]
        ef_construction: usize,
        /// The ef values, comma-separated.
        #[arg(long, default_value = "16,32,64,128")]
        ef: String,
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// Rows inserted after the build by an incremental add (timed apart; 0: none).
        #[arg(long, default_value_t = 0)]
        add: usize,
        /// Where the index file is written (default: a temporary file, removed after).
        #[arg(long, conflicts_with = "load")]
        save: Option<PathBuf>,
        /// Search a graph an earlier run saved (--save) over the same rows instead of building.
        #[arg(long)]
        load: Option<PathBuf>,
        /// Calls per ef (all queries in each).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
    },
    /// Writes a DB of random unit vectors whose meta names MODEL (for timing `deeprank add` into a
    /// big DB: `bench/collection.sh`).
    MakeDb {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        /// `pretrained` (1280-d) or a run folder (its dimension, e.g. 128).
        #[arg(long)]
        model: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Times decode + resize + normalise of a dataset's images (bench/decode.sh compares it with PIL).
    Decode {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 128)]
        size: u32,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Per-layer time of the CPU engine (the pretrained Lite0) on one batch of the first --n
    /// images of a dataset, fused blocks off and on: wall-clock img/s, and the thread-milliseconds
    /// per image of each stage (bench/ort_profile.py gives ONNX Runtime's).
    Layers {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 128)]
        size: u32,
        #[arg(long, default_value_t = 256)]
        n: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The inference 1×1 kernel alone: GFLOP/s on Lite0's layer shapes on warm caches and with
    /// the weights coming from L3 (as between two images in the network), beside one core's FMA
    /// peak (run with --threads 1).
    Kernels {
        /// GFLOP per timed round (each figure is the best of 3 rounds).
        #[arg(long, default_value_t = 4.0)]
        gflop: f64,
    },
    /// Batch-1 latency of the pretrained embedder (a search request's embedding): the first --n
    /// images of a dataset, decoded beforehand, one at a time; p50/p99 (bench/latency.sh compares
    /// it with ONNX Runtime's batch-1 latency). `--threads 1` gives the one-core path.
    Latency {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 128)]
        size: u32,
        #[arg(long, default_value_t = 200)]
        n: usize,
    },
    /// Times the training step (bench/train_step.sh compares it with PyTorch): the seed recipe's
    /// network and optimiser (full fine-tuning, BatchNorm in training mode) on a fixed batch of the
    /// first 3 × TRIPLETS images of a dataset.
    Train {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 128)]
        size: u32,
        #[arg(long, default_value_t = 16)]
        triplets: usize,
        #[arg(long, default_value_t = 128)]
        dim: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// Writes N synthetic clustered rows into a new PostgreSQL collection (--url, sharded over
    /// --shards when given) or a new DB folder (--local) and prints rows/s (bench/pg_bench.sh).
    PgInsert {
        #[arg(long, conflicts_with = "local")]
        url: Option<String>,
        #[arg(long, value_delimiter = ',')]
        shards: Vec<String>,
        #[arg(long)]
        local: Option<PathBuf>,
        #[arg(long, default_value_t = 128)]
        dim: usize,
        #[arg(long, default_value_t = 100_000)]
        n: usize,
        #[arg(long, default_value_t = 2000)]
        batch: usize,
    },
    /// Times single queries of what pg-insert wrote: exact, then HNSW at each --ef (recall@k
    /// against exact), or a DB folder (--local: the exact scan, then its ANN index at each --ef).
    /// p50/p99 latency and queries/s.
    PgQuery {
        #[arg(long, conflicts_with = "local")]
        url: Option<String>,
        #[arg(long)]
        local: Option<PathBuf>,
        #[arg(long, default_value_t = 128)]
        dim: usize,
        #[arg(long, default_value_t = 100_000)]
        n: usize,
        #[arg(long, default_value_t = 100)]
        queries: usize,
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// ef_search values to time with pgvector's HNSW index, or ef of a DB folder's ANN index
        /// (it must exist: `deeprank index`).
        #[arg(long, value_delimiter = ',')]
        ef: Vec<u32>,
        /// Also print EXPLAIN (ANALYZE, VERBOSE) of the first query of each mode.
        #[arg(long)]
        explain: bool,
    },
}

fn run(cli: Cli) -> Result<()> {
    cli.globals.apply()?;
    let threads = cli.globals.threads;
    match cli.cmd {
        Cmd::Plant {
            data,
            out,
            originals,
            planted,
            kinds,
            seed,
        } => {
            let c = Collection::open(&data, Split::Train, &Labels::None)?;
            anyhow::ensure!(
                c.items.len() >= originals && originals > 0,
                "{} has {} images, fewer than --originals {originals}",
                data.display(),
                c.items.len()
            );
            let step = c.items.len() / originals;
            let picked: Vec<PathBuf> = (0..originals)
                .map(|i| c.items[i * step].path.clone())
                .collect();
            let kinds: Vec<&str> = kinds.split(',').map(str::trim).collect();
            let truth =
                benchkit::plant_duplicates(&picked, planted.min(originals), &kinds, &out, seed)?;
            println!(
                "RESULT planted originals={originals} copies={} out={}",
                truth.len(),
                out.display()
            );
        }
        Cmd::Search {
            dir,
            n,
            dim,
            queries,
            k,
            runs,
        } => {
            let (s, dbp, qp) = benchkit::time_search(&dir, n, dim, queries, k, runs)?;
            println!(
                "RESULT deeprank_search n={n} dim={dim} queries={queries} k={k} seconds={s:.5} db={} q={}",
                dbp.display(),
                qp.display()
            );
        }
        Cmd::Ann {
            db_npy,
            queries,
            nq,
            m,
            ef_construction,
            ef,
            k,
            add,
            save,
            load,
            repeat,
            seed,
        } => {
            let threads = threads.unwrap_or(2);
            anyhow::ensure!((2..=255).contains(&m), "--m must be between 2 and 255");
            let efs: Vec<usize> = ef
                .split(',')
                .map(|x| x.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("--ef {ef}: {e} (expected e.g. 16,32,64)"))?;
            let tmp = tempfile_path();
            let path = save.clone().unwrap_or_else(|| tmp.clone());
            let run = benchkit::AnnRun {
                params: deeprank::search::ann::Params {
                    m,
                    ef_construction,
                    seed,
                },
                add,
                save: &path,
                load: load.as_deref(),
                repeat,
            };
            let r = benchkit::time_ann(&db_npy, queries.as_deref(), nq, &efs, k, threads, &run);
            if save.is_none() {
                let _ = std::fs::remove_file(&tmp);
            }
            let r = r?;
            if load.is_none() {
                println!(
                    "RESULT deeprank_ann_build n={} dim={} m={m} ef_construction={ef_construction} threads={threads} build_seconds={:.6} cpu={:.2} index_bytes={} add_rows={} add_seconds={:.6}",
                    r.n, r.dim, r.build_seconds, r.build_cpu, r.index_bytes, r.added, r.add_seconds
                );
            }
            println!(
                "RESULT deeprank_ann_exact n={} dim={} queries={} k={k} threads={threads} seconds={:.6} qps={:.1} cpu={:.2}",
                r.n,
                r.dim,
                r.queries,
                r.exact_seconds,
                r.queries as f64 / r.exact_seconds,
                r.exact_cpu
            );
            for (ef, recall, s, cpu) in &r.runs {
                println!(
                    "RESULT deeprank_ann_search n={} dim={} queries={} k={k} m={m} ef={ef} threads={threads} recall={recall:.4} seconds={s:.6} qps={:.1} cpu={cpu:.2} peak_rss_bytes={}",
                    r.n,
                    r.dim,
                    r.queries,
                    r.queries as f64 / s,
                    r.peak_rss
                );
            }
        }
        Cmd::MakeDb {
            out,
            rows,
            model,
            seed,
        } => {
            let t0 = std::time::Instant::now();
            let dim = benchkit::make_db(&out, rows, &model, seed)?;
            println!(
                "RESULT deeprank_make_db rows={rows} dim={dim} seconds={:.1} db={}",
                t0.elapsed().as_secs_f64(),
                out.display()
            );
        }
        Cmd::Decode { data, size, runs } => {
            let paths = val_paths(&data)?;
            let s = benchkit::time_decode(&paths, size, runs)?;
            println!(
                "RESULT deeprank_decode images={} size={size} seconds={s:.6} img_per_s={:.0}",
                paths.len(),
                paths.len() as f64 / s
            );
        }
        Cmd::Layers {
            data,
            size,
            n,
            runs,
        } => {
            let paths = val_paths(&data)?;
            let all = benchkit::time_layers(&paths, size, n, runs)?;
            let threads = rayon::current_num_threads();
            for t in &all {
                println!(
                    "RESULT deeprank_layers_{} size={size} images={} img_per_s={:.1} threads={threads}",
                    t.name,
                    n.min(paths.len()),
                    t.img_per_s
                );
            }
            println!(
                "| stage | {} |",
                all.iter()
                    .map(|t| match t.name {
                        "plain" => "layer by layer ms/img",
                        "fused" => "fused ms/img",
                        _ => "fused + grouped tail ms/img",
                    })
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            println!("|---|{}", "---|".repeat(all.len()));
            for (i, (name, _)) in all[0].stages.iter().enumerate() {
                let row: Vec<String> = all
                    .iter()
                    .map(|t| format!("{:.3}", t.stages[i].1 * 1e3))
                    .collect();
                println!("| {name} | {} |", row.join(" | "));
            }
            let total: Vec<String> = all
                .iter()
                .map(|t| format!("{:.3}", t.stages.iter().map(|s| s.1).sum::<f64>() * 1e3))
                .collect();
            println!("| total (thread-ms per image) | {} |", total.join(" | "));
        }
        Cmd::Kernels { gflop } => {
            match benchkit::fma_peak(gflop * 4.0) {
                Some(g) => println!("RESULT fma_peak gflops={g:.1}"),
                None => println!("RESULT fma_peak gflops=none (no AVX-512, no AVX2 + FMA)"),
            }
            let shapes = benchkit::KERNEL_SHAPES;
            let warm = benchkit::time_pointwise(&shapes, gflop);
            let cold = benchkit::time_pointwise_cold(&shapes, gflop);
            for ((&(px, cin, cout), g), c) in shapes.iter().zip(warm).zip(cold) {
                println!(
                    "RESULT pointwise pixels={px} cin={cin} cout={cout} gflops={g:.1} weights_from_l3_gflops={c:.1}"
                );
            }
        }
        Cmd::Latency { data, size, n } => {
            let paths = val_paths(&data)?;
            let secs = benchkit::time_latency(&paths, size, n)?;
            println!(
                "RESULT deeprank_b1 size={size} images={} p50_ms={:.2} p99_ms={:.2} threads={} min_ms={:.2} p10_ms={:.2}",
                secs.len(),
                benchkit::quantile(&secs, 0.5) * 1e3,
                benchkit::quantile(&secs, 0.99) * 1e3,
                rayon::current_num_threads(),
                benchkit::quantile(&secs, 0.0) * 1e3,
                benchkit::quantile(&secs, 0.1) * 1e3,
            );
        }
        Cmd::Train {
            data,
            size,
            triplets,
            dim,
            warmup,
            steps,
        } => {
            let (sec, loss) = train::step::time_train(&data, size, triplets, dim, warmup, steps)?;
            println!(
                "RESULT deeprank_train size={size} triplets={triplets} seconds_per_step={sec:.6} img_per_s={:.1} loss={loss:.4}",
                (3 * triplets) as f64 / sec
            );
        }
        Cmd::PgInsert {
            url,
            shards,
            local,
            dim,
            n,
            batch,
        } => {
            let (what, s) = match (&url, &local) {
                (Some(u), _) => (
                    if shards.is_empty() {
                        "one_server".to_string()
                    } else {
                        format!("{}_shards", shards.len())
                    },
                    benchkit::pg_insert(u, &shards, dim, n, batch)?,
                ),
                (None, Some(d)) => ("local_db".to_string(), benchkit::local_insert(d, dim, n)?),
                _ => anyhow::bail!("--url or --local"),
            };
            println!(
                "RESULT pg_insert target={what} n={n} dim={dim} batch={batch} seconds={s:.3} rows_per_s={:.0}",
                n as f64 / s
            );
        }
        Cmd::PgQuery {
            url,
            local,
            dim,
            n,
            queries,
            k,
            ef,
            explain,
        } => {
            use deeprank::store::pg::{Iterative, Mode};
            let show = |mode: Mode| -> Result<()> {
                if let (true, Some(u)) = (explain, &url) {
                    let plan = benchkit::explain_query(u, n, dim, k, mode)?;
                    println!("PLAN {mode:?}\n{plan}");
                }
                Ok(())
            };
            show(Mode::Exact)?;
            let print = |mode: &str, secs: &[f64], recall: Option<f64>| {
                let total: f64 = secs.iter().sum();
                println!(
                    "RESULT pg_query target={} n={n} dim={dim} k={k} mode={mode} queries={} p50_ms={:.2} p99_ms={:.2} qps={:.1}{}",
                    if url.is_some() { "store" } else { "local_db" },
                    secs.len(),
                    benchkit::quantile(secs, 0.5) * 1e3,
                    benchkit::quantile(secs, 0.99) * 1e3,
                    secs.len() as f64 / total,
                    recall
                        .map(|r| format!(" recall={r:.3}"))
                        .unwrap_or_default()
                );
            };
            let (secs, exact) = benchkit::time_queries(
                url.as_deref(),
                local.as_deref(),
                n,
                dim,
                queries,
                k,
                Mode::Exact,
            )?;
            print("exact", &secs, None);
            for e in ef {
                let mode = Mode::Hnsw {
                    ef: e,
                    iterative: Iterative::Relaxed,
                };
                show(mode)?;
                let (secs, got) = benchkit::time_queries(
                    url.as_deref(),
                    local.as_deref(),
                    n,
                    dim,
                    queries,
                    k,
                    mode,
                )?;
                let hit: usize = exact
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| a.iter().filter(|x| b.contains(x)).count())
                    .sum();
                let all: usize = exact.iter().map(Vec::len).sum();
                print(
                    &format!("hnsw_ef{e}"),
                    &secs,
                    Some(hit as f64 / all.max(1) as f64),
                );
            }
        }
    }
    Ok(())
}

/// A fresh file name in the temporary folder for an index the bench removes after.
fn tempfile_path() -> PathBuf {
    std::env::temp_dir().join(format!("deeprank-bench-ann-{}.hnsw", std::process::id()))
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The image paths of a dataset's val split (what `decode` and `latency` time).
fn val_paths(data: &Path) -> Result<Vec<PathBuf>> {
    let ds = Dataset::open(data, Split::Val)?;
    Ok(ds.items.iter().map(|i| i.path.clone()).collect())
}
