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

/// The same without presence, which a Redis Cluster does not offer yet.
const HERALD_SHARDED_CONFIG: &str = "[[topics]]\npattern = \"bench.volatile.>\"\nhistory = false\n";

/// A Redis Cluster's nodes: three masters, each with a replica.
const REDIS_CLUSTER_NODES: usize = 6;
/// How long a master may be silent before its replica takes over: short,
/// so that a failover fits in a run (Redis's default is 15 s).
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 2000;

/// The HS256 secret every node of a run verifies tokens with.
pub fn secret() -> &'static str {
    static SECRET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SECRET.get_or_init(|| {
        use std::io::Read as _;
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut random| random.read_exact(&mut bytes))
            .expect("/dev/urandom gives 32 bytes");
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    })
}

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
    /// Killed on purpose by the scenario (a crash it measures).
    killed: bool,
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
            killed: false,
        })
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    fn kill_now(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        self.killed = true;
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
        if self.killed {
            let _ = self.child.wait().await;
            return;
        }
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

/// A free port whose Redis Cluster bus port (10000 above) is free too.
fn free_cluster_port() -> Result<u16> {
    for _ in 0..1000 {
        let port = free_port()?;
        if port <= 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port pair for a Redis Cluster node")
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
    /// The private Redis: one process, or a Redis Cluster's six.
    redis: Vec<(SocketAddr, Proc)>,
    /// Whether the Redis is a Redis Cluster (`redis.mode = "cluster"`).
    sharded: bool,
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

    /// `count` Herald nodes on a private Redis Cluster (three masters
    /// with a replica each, `--cluster-node-timeout`
    /// [`CLUSTER_NODE_TIMEOUT_MS`]) in `redis.mode = "cluster"`.
    pub async fn start_sharded(
        count: usize,
        paths: &Paths,
        env: &[(&str, &str)],
    ) -> Result<Cluster> {
        Cluster::begin(System::Herald, true, paths)?
            .launched(count, true, paths, env)
            .await
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
        Cluster::begin(system, false, paths)?
            .launched(count, relay, paths, env)
            .await
    }

    fn begin(system: System, sharded: bool, paths: &Paths) -> Result<Cluster> {
        std::fs::create_dir_all(&paths.work_dir)?;
        Ok(Cluster {
            system,
            nodes: Vec::new(),
            redis: Vec::new(),
            sharded,
            database: None,
        })
    }

    async fn launched(
        mut self,
        count: usize,
        relay: bool,
        paths: &Paths,
        env: &[(&str, &str)],
    ) -> Result<Cluster> {
        match self.launch(count, relay, paths, env).await {
            Ok(()) => Ok(self),
            Err(e) => {
                // Whatever did start (and the database) goes away.
                self.stop().await;
                Err(e)
            }
        }
    }

    /// Starts the private Redis; its URL for the nodes.
    async fn start_redis(&mut self, paths: &Paths) -> Result<String> {
        let count = if self.sharded { REDIS_CLUSTER_NODES } else { 1 };
        for i in 0..count {
            let port = if self.sharded {
                free_cluster_port()?
            } else {
                free_port()?
            };
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
            let mut name = format!("{}-redis", self.system.name());
            if self.sharded {
                let node_timeout = CLUSTER_NODE_TIMEOUT_MS.to_string();
                command
                    .args(["--cluster-enabled", "yes", "--cluster-node-timeout"])
                    .arg(&node_timeout)
                    .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                    .arg("--dir")
                    .arg(&paths.work_dir);
                name = format!("{name}-{i}");
            }
            let redis = Proc::spawn(&name, command, &paths.work_dir)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            self.redis.push((addr, redis));
            wait_for_port(addr).await?;
        }
        let urls: Vec<String> = self
            .redis
            .iter()
            .map(|(addr, _)| format!("redis://{addr}"))
            .collect();
        if self.sharded {
            let created = Command::new(redis_cli(paths))
                .args(["--cluster", "create"])
                .args(self.redis.iter().map(|(addr, _)| addr.to_string()))
                .args(["--cluster-replicas", "1", "--cluster-yes"])
                .stdout(Stdio::null())
                .status()
                .await
                .context("cannot run redis-cli --cluster create")?;
            if !created.success() {
                bail!("redis-cli --cluster create failed");
            }
            self.wait_cluster_healthy(paths).await?;
        }
        Ok(urls.join(","))
    }

    /// Waits (at most 30 s) until the Redis Cluster is ok, with three
    /// masters and every replica in sync.
    pub async fn wait_cluster_healthy(&self, paths: &Paths) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut healthy = self.redis_masters(paths).await?.len() == 3;
            for (addr, proc) in &self.redis {
                if !healthy || proc.killed {
                    break;
                }
                let info = redis_cli_query(paths, *addr, &["cluster", "info"]).await;
                let replication = redis_cli_query(paths, *addr, &["info", "replication"]).await;
                let in_sync = !replication.contains("role:slave")
                    || replication.contains("master_link_status:up");
                healthy = info.contains("cluster_state:ok") && in_sync;
            }
            if healthy {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the Redis Cluster is not healthy after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The Redis Cluster's masters that are up, as a live node sees them.
    pub async fn redis_masters(&self, paths: &Paths) -> Result<Vec<SocketAddr>> {
        for (addr, proc) in &self.redis {
            if proc.killed {
                continue;
            }
            let nodes = redis_cli_query(paths, *addr, &["cluster", "nodes"]).await;
            if nodes.is_empty() {
                continue;
            }
            let mut masters: Vec<SocketAddr> = nodes
                .lines()
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split(' ').collect();
                    let flags = fields.get(2)?;
                    if !flags.contains("master") || flags.contains("fail") {
                        return None;
                    }
                    fields.get(1)?.split('@').next()?.parse().ok()
                })
                .collect();
            masters.sort();
            return Ok(masters);
        }
        bail!("no Redis Cluster node answers")
    }

    /// The master that owns `key`'s slot.
    pub async fn redis_master_of(&self, paths: &Paths, key: &str) -> Result<SocketAddr> {
        let (first, _) = self.redis.first().context("this run has no Redis")?;
        let slot: u16 = redis_cli_query(paths, *first, &["cluster", "keyslot", key])
            .await
            .trim()
            .parse()
            .context("CLUSTER KEYSLOT answered no number")?;
        let shards = redis_cli_query(paths, *first, &["cluster", "nodes"]).await;
        for line in shards.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            for range in &fields[8..] {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(start), Ok(end)) = (start.parse::<u16>(), end.parse::<u16>())
                    && (start..=end).contains(&slot)
                {
                    return fields[1]
                        .split('@')
                        .next()
                        .and_then(|a| a.parse().ok())
                        .context("a node address CLUSTER NODES cannot give");
                }
            }
        }
        bail!("no master owns slot {slot}")
    }

    /// Kills the Redis process at `addr` at once (SIGKILL).
    pub fn kill_redis(&mut self, addr: SocketAddr) {
        if let Some((_, proc)) = self.redis.iter_mut().find(|(a, _)| *a == addr) {
            proc.kill_now();
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
            Some(self.start_redis(paths).await?)
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
                    let settings = if self.sharded {
                        HERALD_SHARDED_CONFIG
                    } else {
                        HERALD_CONFIG
                    };
                    std::fs::write(&config, settings)?;
                    let mut command = Command::new(&paths.herald_bin);
                    command
                        .arg("serve")
                        .arg("--config")
                        .arg(&config)
                        .current_dir(&paths.work_dir)
                        .env("RUST_LOG", "warn")
                        .env("HERALD__SERVER__BIND", addr.to_string())
                        .env("HERALD__AUTH__JWT_SECRET", secret())
                        .env(
                            "HERALD__STORE__URL",
                            format!("{}/{db}", server.trim_end_matches('/')),
                        )
                        .env("HERALD__LIMITS__MAX_CONNECTIONS", "20000")
                        // Every client of a run is one user ("bench"): the
                        // per-user limits would measure themselves.
                        .env("HERALD__LIMITS__MAX_CONNECTIONS_PER_SUB", "20000")
                        .env("HERALD__LIMITS__HTTP_PUBLISH_RATE", "100000000")
                        .env("HERALD__LIMITS__HTTP_READ_RATE", "100000000");
                    if let Some(url) = &redis_url {
                        command.env("HERALD__REDIS__URL", url);
                    }
                    if self.sharded {
                        command.env("HERALD__REDIS__MODE", "cluster");
                    }
                    command
                }
                System::SocketIo => {
                    let mut command = Command::new("node");
                    command
                        .arg(paths.socketio_dir.join("server.js"))
                        .env("PORT", port.to_string())
                        .env("JWT_SECRET", secret())
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
        let stats = self.redis_command_stats(commands).await?;
        Ok(stats.iter().map(|(_, _, usec)| usec).sum())
    }

    /// Per Redis process that is up: its address, and the calls of
    /// `commands` and the microseconds spent on them since the last call
    /// (as [`redis_command_micros`](Self::redis_command_micros)).
    pub async fn redis_command_stats(
        &self,
        commands: &[&str],
    ) -> Result<Vec<(SocketAddr, u64, u64)>> {
        if self.redis.is_empty() {
            bail!("this run has no Redis");
        }
        let mut stats = Vec::new();
        for (addr, proc) in &self.redis {
            if !proc.killed {
                let (calls, usec) = command_stats(*addr, commands).await?;
                stats.push((*addr, calls, usec));
            }
        }
        Ok(stats)
    }
}

/// Calls and microseconds of `commands` on the Redis at `addr` since its
/// stats were last reset; resets them.
async fn command_stats(addr: SocketAddr, commands: &[&str]) -> Result<(u64, u64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    let (mut calls, mut usec) = (0, 0);
    for line in text.lines() {
        let Some((name, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        if !commands.contains(&name) {
            continue;
        }
        let number = |key: &str| {
            stats
                .split(',')
                .find_map(|f| f.strip_prefix(key))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        calls += number("calls=");
        usec += number("usec=");
    }
    Ok((calls, usec))
}

impl Cluster {
    /// Resident memory of the run's Redis, when it has one.
    pub fn redis_rss(&self) -> Option<u64> {
        (!self.redis.is_empty()).then(|| self.redis.iter().map(|(_, p)| p.rss()).sum())
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
        self.redis
            .iter()
            .filter(|(_, p)| !p.killed)
            .map(|(_, p)| p.cpu())
            .sum()
    }

    /// Stops every process and drops the run's database. Problems are
    /// reported, not returned: the next run should still happen.
    pub async fn stop(self) {
        for node in self.nodes {
            node.proc.stop().await;
        }
        for (_, redis) in self.redis {
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

/// `redis-cli`, beside `redis-server`.
fn redis_cli(paths: &Paths) -> PathBuf {
    paths.redis_server.with_file_name("redis-cli")
}

/// What `redis-cli` prints for `args` against the Redis at `addr`; empty
/// when it cannot say.
async fn redis_cli_query(paths: &Paths, addr: SocketAddr, args: &[&str]) -> String {
    let output = Command::new(redis_cli(paths))
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args)
        .output()
        .await;
    match output {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).into(),
        _ => String::new(),
    }
}
