//! `deeprank serve`: the visual search engine over HTTP. A single page at `/`, a JSON API, and
//! micro-batching: uploads that arrive together are embedded in one batch by one worker; a bounded
//! queue answers 503 with `Retry-After` when full instead of growing memory. The DB is followed
//! as it changes (`live`), and with `--writable` images can be added over HTTP (`upload`).

mod limits;
mod live;
mod routes;
mod store;
mod upload;
mod worker;

use crate::infer::embedder::Embedder;
use crate::search::query;
use crate::store::db::Db;
use anyhow::{Context, Result, bail};
use live::LiveDb;
use routes::AppState;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::sync_channel;
use std::time::Duration;
use worker::{Counters, Job, worker};

pub use limits::upload_bytes;
pub use store::StoreServeOptions;

/// What is served: a DB folder (followed as it changes) or a PostgreSQL store.
enum Source {
    Folder(Arc<LiveDb>),
    Store(Arc<store::StoreSource>),
}

pub(super) const INDEX: &str = include_str!("index.html");

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub addr: String,
    /// Largest accepted upload in bytes (larger: 413).
    pub max_upload: usize,
    /// Largest image (header-declared pixels) accepted (larger: 413, before decoding).
    pub max_pixels: u64,
    /// Uploads admitted beyond one batch: at most `queue + max_batch` uploads are in flight
    /// (being received, decoded, waiting for the embedder or in its batch); the next gets 503.
    pub queue: usize,
    /// Images embedded together at most.
    pub max_batch: usize,
    /// How long the worker waits for more jobs to fill a batch.
    pub batch_wait: Duration,
    pub max_top: usize,
    /// Worker threads of the async runtime (`--threads`).
    pub threads: usize,
    /// Accept `POST /api/images` (needs `api_key`).
    pub writable: bool,
    /// The key `Authorization: Bearer KEY` must carry to change the collection.
    pub api_key: Option<String>,
    /// How often the DB's commit record is polled for changes (zero: never; `POST /api/reload`).
    pub reload_every: Duration,
    /// How searches use the DB's ANN index (`--ef`, `--recall`, `--exact`).
    pub search: crate::search::ann::db::Mode,
}

impl ServeOptions {
    /// Uploads in flight at most ([`ServeOptions::queue`]).
    pub fn admission_limit(&self) -> usize {
        self.queue + self.max_batch
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".into(),
            max_upload: 10 << 20,
            max_pixels: 40_000_000,
            queue: 64,
            max_batch: 16,
            batch_wait: Duration::from_millis(3),
            max_top: 100,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            writable: false,
            api_key: None,
            reload_every: Duration::from_secs(1),
            search: Default::default(),
        }
    }
}

fn check_writable(opts: &ServeOptions) -> Result<()> {
    if opts.writable && opts.api_key.as_deref().is_none_or(str::is_empty) {
        bail!("--writable needs --api-key KEY (or DEEPRANK_API_KEY): uploads must be authorised");
    }
    Ok(())
}

/// Starts the server over a DB folder and runs until Ctrl-C. Prints `listening on http://ADDR`
/// once bound.
pub fn serve(db: Db, emb: Embedder, opts: ServeOptions) -> Result<()> {
    query::check_compatible(&db, &emb)?;
    check_writable(&opts)?;
    let live = Arc::new(LiveDb::new(db, &emb));
    if !opts.reload_every.is_zero() {
        live.clone().poll(opts.reload_every)?;
    }
    run(Source::Folder(live), emb, opts)
}

/// Starts the server over a PostgreSQL store (`emb`: the store's model) and runs until Ctrl-C.
pub fn serve_store(
    st: crate::store::pg::PgStore,
    emb: Embedder,
    opts: ServeOptions,
    store_opts: StoreServeOptions,
) -> Result<()> {
    crate::search::pg::check_compatible(&st, &emb)?;
    check_writable(&opts)?;
    if opts.writable && store_opts.uploads.is_none() {
        bail!(
            "--writable with a PostgreSQL store needs --uploads DIR: the folder where uploaded images are kept \
             (the store holds their path, vector and hash)"
        );
    }
    let src = store::StoreSource::new(st, store_opts)?;
    run(Source::Store(Arc::new(src)), emb, opts)
}

fn run(source: Source, emb: Embedder, opts: ServeOptions) -> Result<()> {
    let live = match &source {
        Source::Folder(l) => Some(l.clone()),
        Source::Store(_) => None,
    };
    let counters = Arc::new(Counters::default());
    // Admission keeps at most queue + max_batch uploads in flight, so the channel never fills;
    // its capacity matches.
    let (tx, rx) = sync_channel::<Job>(opts.admission_limit().max(1));
    let state = Arc::new(AppState {
        inflight: Arc::new(AtomicUsize::new(0)),
        source,
        jobs: tx,
        size: emb.size,
        model: emb.identity.clone(),
        opts: opts.clone(),
        counters: counters.clone(),
    });
    {
        let (live, opts, counters) = (live.clone(), opts.clone(), counters.clone());
        std::thread::Builder::new()
            .name("embed-worker".into())
            .spawn(move || worker(emb, live, rx, opts, counters))
            .context("cannot start the embedding worker")?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&opts.addr)
            .await
            .with_context(|| format!("cannot listen on {}: is the port in use?", opts.addr))?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        use std::io::Write;
        std::io::stdout().flush().ok();
        axum::serve(listener, routes::router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("server error")
    })
}
