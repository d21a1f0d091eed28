//! The systems under test, as child processes the harness starts, measures
//! (CPU time and resident memory from `/proc`) and stops: Herald nodes,
//! Socket.IO nodes, the harness's own echo floor, and a private Redis.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::http::Http;

/// Herald's config file for a run: topics under `bench.volatile.` keep no
/// history, to tell the relay's latency from the event log's.
const HERALD_CONFIG: &str = "[[topics]]\npattern = \"bench.volatile.>\"\nhistory = false\n\
    [[topics]]\npattern = \"bench.presence.>\"\nhistory = false\npresence = true\n";

/// The HS256 secret every node of a run verifies tokens with.
pub const SECRET: &str = "herald-bench-secret-0123456789abcdef";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    Herald,
    SocketIo,
    /// The harness's do-nothing echo: the floor of this machine.
    Echo,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Herald => "herald",
            System::SocketIo => "socketio",
            System::Echo => "echo",
        }
    }
}

/// Where the harness finds what it runs.
#[derive(Clone, Debug)]
pub struct Paths {
    pub herald_bin: PathBuf,
    pub socketio_dir: PathBuf,
    pub redis_server: PathBuf,
    /// PostgreSQL server URL (no database); each run creates and drops its own.
    pub postgres: String,
    /// Logs of the processes the harness starts.
    pub work_dir: PathBuf,
}

/// A child process and what `/proc` says about it.
pub struct Proc {
    name: String,
    child: Child,
    pid: u32,
}

impl Proc {
    fn spawn(name: &str, mut command: Command, log_dir: &Path) -> Result<Proc> {
        let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}: {command:?}"))?;
        let pid = child.id().context("child has no pid")?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            pid,
        })
    }

    /// User + system CPU time so far.
    pub fn cpu(&self) -> Duration {
        cpu_of(&format!("/proc/{}/stat", self.pid))
    }

    /// Resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status}); see its log", self.name);
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 5 s.
    async fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// CPU time of a process from its `/proc/<pid>/stat` (utime + stime).
fn cpu_of(stat_path: &str) -> Duration {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, i.e. the 12th and 13th after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let mut fields = rest.split_whitespace().skip(11);
    let ticks: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// The harness's own CPU time (all threads), at microsecond resolution.
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A node of the system under test.
pub struct Node {
    pub addr: SocketAddr,
    pub proc: Proc,
}

/// The processes of one system for one scenario.
pub struct Cluster {
    pub system: System,
    pub nodes: Vec<Node>,
    redis: Option<Proc>,
    /// Where the private Redis listens.
    redis_addr: Option<SocketAddr>,
    database: Option<(String, String)>,
}

impl Cluster {
    /// Starts `count` nodes of `system`; with `relay`, they share a private
    /// Redis (and Herald nodes a PostgreSQL database made for this run).
    pub async fn start(
        system: System,
        count: usize,
        relay: bool,
        paths: &Paths,
    ) -> Result<Cluster> {
        Cluster::start_with_env(system, count, relay, paths, &[]).await
    }

    /// [`start`](Self::start), with extra environment variables for every
    /// node (a scenario's own settings, e.g. `HERALD__RETENTION__…`).
    pub async fn start_with_env(
        system: System,
        count: usize,
        relay: bool,
        paths: &Paths,
        env: &[(&str, &str)],
    ) -> Result<Cluster> {
        std::fs::create_dir_all(&paths.work_dir)?;
        let mut cluster = Cluster {
            system,
            nodes: Vec::new(),
            redis: None,
            redis_addr: None,
            database: None,
        };
        match cluster.launch(count, relay, paths, env).await {
            Ok(()) => Ok(cluster),
            Err(e) => {
                // Whatever did start (and the database) goes away.
                cluster.stop().await;
                Err(e)
            }
        }
    }

    async fn launch(
        &mut self,
        count: usize,
        relay: bool,
        paths: &Paths,
        env: &[(&str, &str)],
    ) -> Result<()> {
        let redis_url = if relay {
            let port = free_port()?;
            let mut command = Command::new(&paths.redis_server);
            command.args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]);
            let redis = Proc::spawn(
                &format!("{}-redis", self.system.name()),
                command,
                &paths.work_dir,
            )?;
            self.redis = Some(redis);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            self.redis_addr = Some(addr);
            wait_for_port(addr).await?;
            Some(format!("redis://127.0.0.1:{port}"))
        } else {
            None
        };
        if self.system == System::Herald {
            let name = format!(
                "herald_bench_{}_{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_millis()
            );
            self.database = Some((paths.postgres.clone(), name));
        }
        for i in 0..count {
            let port = free_port()?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let name = format!("{}-{}", self.system.name(), (b'a' + i as u8) as char);
            let mut command = match self.system {
                System::Herald => {
                    let (server, db) = self.database.as_ref().expect("set above");
                    let config = paths.work_dir.join("herald-bench.toml");
                    std::fs::write(&config, HERALD_CONFIG)?;
                    let mut command = Command::new(&paths.herald_bin);
                    command
                        .arg("serve")
                        .arg("--config")
                        .arg(&config)
                        .current_dir(&paths.work_dir)
                        .env("RUST_LOG", "warn")
                        .env("HERALD__SERVER__BIND", addr.to_string())
                        .env("HERALD__AUTH__JWT_SECRET", SECRET)
                        .env(
                            "HERALD__STORE__URL",
                            format!("{}/{db}", server.trim_end_matches('/')),
                        )
                        .env("HERALD__LIMITS__MAX_CONNECTIONS", "20000")
                        // Every client of a run is one user ("bench"): the
                        // per-user limits would measure themselves.
                        .env("HERALD__LIMITS__MAX_CONNECTIONS_PER_SUB", "20000")
                        .env("HERALD__LIMITS__HTTP_PUBLISH_RATE", "100000000");
                    if let Some(url) = &redis_url {
                        command.env("HERALD__REDIS__URL", url);
                    }
                    command
                }
                System::SocketIo => {
                    let mut command = Command::new("node");
                    command
                        .arg(paths.socketio_dir.join("server.js"))
                        .env("PORT", port.to_string())
                        .env("JWT_SECRET", SECRET)
                        .env(
                            "REDIS_URL",
                            redis_url.as_deref().unwrap_or("redis://127.0.0.1:6379"),
                        );
                    command
                }
                System::Echo => {
                    let mut command = Command::new(std::env::current_exe()?);
                    command.args(["echo", "--bind", &addr.to_string()]);
                    command
                }
            };
            command.envs(env.iter().copied());
            let proc = Proc::spawn(&name, command, &paths.work_dir)?;
            self.nodes.push(Node { addr, proc });
            // Nodes start one after another: the first Herald node creates
            // the database and runs the migrations.
            let ready = match self.system {
                System::Herald => Some("/readyz"),
                System::SocketIo => Some("/healthz"),
                System::Echo => None,
            };
            let node = self.nodes.last_mut().expect("pushed");
            wait_ready(node, ready).await?;
        }
        Ok(())
    }

    /// Microseconds the private Redis spent executing the `commands`
    /// (lower case, e.g. `evalsha`) since the last call (its `INFO
    /// commandstats`, reset at each call): Redis's own account, finer than
    /// `/proc`'s 10 ms ticks. A script's time includes the commands it
    /// calls, which Redis also counts under their own names: name only
    /// the commands clients send.
    pub async fn redis_command_micros(&self, commands: &[&str]) -> Result<u64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.redis_addr.context("this run has no Redis")?;
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(b"INFO commandstats\r\nCONFIG RESETSTAT\r\n")
            .await?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 8192];
        // The bulk INFO reply, then +OK.
        while !reply.ends_with(b"+OK\r\n") {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                bail!("Redis closed the connection");
            }
            reply.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&reply);
        Ok(text
            .lines()
            .filter_map(|l| {
                let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                if !commands.contains(&name) {
                    return None;
                }
                let usec = stats.split(',').find_map(|f| f.strip_prefix("usec="))?;
                usec.parse::<u64>().ok()
            })
            .sum())
    }

    /// Resident memory of the run's Redis, when it has one.
    pub fn redis_rss(&self) -> Option<u64> {
        self.redis.as_ref().map(Proc::rss)
    }

    /// CPU time of all nodes together.
    pub fn cpu(&self) -> Duration {
        self.nodes.iter().map(|n| n.proc.cpu()).sum()
    }

    /// CPU time of the PostgreSQL backends serving this run's database
    /// (Herald's event log), or `None` when the system has no database.
    /// Backends are found in `pg_stat_activity` at each call; the pool's
    /// connections live for the whole run.
    pub async fn store_cpu(&self) -> Option<Duration> {
        use sqlx::Connection;
        let (server, db) = self.database.as_ref()?;
        let url = format!("{}/postgres", server.trim_end_matches('/'));
        let mut conn = sqlx::PgConnection::connect(&url).await.ok()?;
        let pids: Vec<i32> =
            sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
                .bind(db)
                .fetch_all(&mut conn)
                .await
                .ok()?;
        let _ = conn.close().await;
        Some(
            pids.iter()
                .map(|pid| cpu_of(&format!("/proc/{pid}/stat")))
                .sum(),
        )
    }

    /// Runs `sql` on this run's database (Herald's event log) and returns
    /// the first column of its first row, if it has one (a bigint): for a
    /// scenario that checks what the store keeps, or maintains it as a
    /// database server would. A `'static` text: the scenario's own.
    pub async fn store_sql(&self, sql: &'static str) -> Result<Option<i64>> {
        use sqlx::{Connection, Row};
        let url = self.database_url()?;
        let mut conn = sqlx::PgConnection::connect(&url)
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let row = sqlx::raw_sql(sql)
            .fetch_optional(&mut conn)
            .await
            .with_context(|| format!("{sql} failed"))?;
        let _ = conn.close().await;
        row.map(|row| row.try_get::<i64, _>(0))
            .transpose()
            .with_context(|| format!("{sql} answered no bigint"))
    }

    /// The URL of this run's database (Herald's event log).
    pub fn database_url(&self) -> Result<String> {
        let (server, db) = self
            .database
            .as_ref()
            .context("only Herald runs have a database")?;
        Ok(format!("{}/{db}", server.trim_end_matches('/')))
    }

    /// CPU time of the private Redis.
    pub fn redis_cpu(&self) -> Duration {
        self.redis.as_ref().map_or(Duration::ZERO, Proc::cpu)
    }

    /// Stops every process and drops the run's database. Problems are
    /// reported, not returned: the next run should still happen.
    pub async fn stop(self) {
        for node in self.nodes {
            node.proc.stop().await;
        }
        if let Some(redis) = self.redis {
            redis.stop().await;
        }
        if let Some((server, db)) = self.database
            && let Err(e) = drop_database(&server, &db).await
        {
            eprintln!("herald-bench: could not drop database {db} (--postgres): {e:#}");
        }
    }
}

async fn drop_database(server: &str, db: &str) -> Result<()> {
    use sqlx::Connection;
    let url = format!("{}/postgres", server.trim_end_matches('/'));
    let mut conn = sqlx::PgConnection::connect(&url)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    // The name is the harness's own, made in `Cluster::start`; identifiers
    // cannot be bound.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}

async fn wait_for_port(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn wait_ready(node: &mut Node, path: Option<&str>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        node.proc.check_alive()?;
        if let Ok(mut http) = Http::connect(node.addr).await {
            match path {
                None => return Ok(()),
                Some(path) => {
                    if let Ok(res) = http.get(path).await
                        && res.status == 200
                    {
                        return Ok(());
                    }
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{} at {} not ready after 60 s", node.proc.name, node.addr);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
