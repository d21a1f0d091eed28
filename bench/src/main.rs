//! `herald-bench`: Herald's benchmark harness. It starts the systems under
//! test as local processes on loopback (Herald nodes with a private Redis
//! and a PostgreSQL database made for the run, Socket.IO nodes with the
//! Redis adapter, and its own echo floor), drives them with bounded loads,
//! and prints one JSON line per scenario and system, then a table with
//! Herald's figures as ratios to Socket.IO's. See docs/benchmarks.md.

mod client;
mod echo;
mod http;
mod nodes;
mod report;
mod scenario;
mod sse;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::client::Transport;
use crate::nodes::{Cluster, Paths, System};
use crate::report::Report;
use crate::scenario::{connections, fanout, latency, presence, prune, publish, shards};

#[derive(Parser)]
#[command(
    version,
    about = "Herald's benchmark harness (loopback only, bounded loads)"
)]
struct Cli {
    #[command(flatten)]
    setup: Setup,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Setup {
    /// The herald binary to run (default: `herald` beside this binary).
    #[arg(long, global = true, env = "HERALD_BIN")]
    herald_bin: Option<PathBuf>,
    /// Folder of the Socket.IO node; `npm ci` runs there when its
    /// node_modules is missing.
    #[arg(long, global = true, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/socketio"))]
    socketio_dir: PathBuf,
    /// PostgreSQL server for Herald's event log; each run creates and drops
    /// its own database there.
    #[arg(
        long,
        global = true,
        env = "HERALD_BENCH_POSTGRES",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    postgres: String,
    /// redis-server binary; each run starts a private one on a free port.
    #[arg(long, global = true, default_value = "redis-server")]
    redis_server: PathBuf,
    /// Where the started processes write their logs.
    #[arg(long, global = true, default_value = "target/herald-bench")]
    work_dir: PathBuf,
    /// Systems to measure, comma-separated: herald, socketio.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "herald,socketio"
    )]
    systems: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario with the documented counts (several minutes).
    All,
    /// Every scenario with small counts: checks the harness works.
    Smoke,
    /// S subscribers over 2 nodes, one publisher at a fixed rate.
    Fanout(FanoutArgs),
    /// One subscriber on node B, publishes to node A, and the echo floor.
    Latency(LatencyArgs),
    /// C idle authenticated connections to one node.
    Connections(ConnectionsArgs),
    /// HTTP publish throughput with the PostgreSQL log (Herald only).
    Publish(PublishArgs),
    /// Time the pruning passes that remove one-shot topics, and the idle
    /// passes after them (Herald only).
    Prune(PruneArgs),
    /// M members join one topic's presence over 2 nodes; then the cost of
    /// counting and paging them (Herald only).
    Presence(PresenceArgs),
    /// T topics over 2 nodes on one Redis and on a Redis Cluster: Redis
    /// time per publish and the spread over masters; then a master killed
    /// under load (Herald only).
    Shards(ShardsArgs),
    /// Internal: the do-nothing echo server the latency floor is measured on.
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        bind: SocketAddr,
    },
}

#[derive(Args, Clone)]
struct FanoutArgs {
    #[arg(long, default_value_t = 10_000)]
    subscribers: usize,
    /// Offered deliveries per second (events/s × subscribers).
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Also run at this offered rate, to measure sustained throughput under
    /// overload (0: skip).
    #[arg(long, default_value_t = 0)]
    overload_rate: u64,
    /// Spread the subscribers over this many topics, each published to at
    /// the same rate (the same offered deliveries in total).
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Herald nodes (1: a single node, no Redis).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Also run with each of these subscriber counts (comma-separated) at
    /// --sweep-rate, each beside the echo floor: the fan-out tail across
    /// audiences.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    #[arg(long, default_value_t = 40_000)]
    sweep_rate: u64,
    /// Also run the first fan-out with Herald's subscribers on SSE
    /// streams instead of WebSockets (`fanout_sse`).
    #[arg(long)]
    sse: bool,
}

#[derive(Args, Clone)]
struct LatencyArgs {
    #[arg(long, default_value_t = 1000)]
    events: u64,
    /// Events per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
}

#[derive(Args, Clone)]
struct ConnectionsArgs {
    #[arg(long, default_value_t = 15_000)]
    connections: usize,
    /// All connections on one topic (default: one topic each).
    #[arg(long)]
    shared_topic: bool,
    /// Also open as many idle SSE streams on Herald (`connections_sse`).
    #[arg(long)]
    sse: bool,
}

#[derive(Args, Clone)]
struct PublishArgs {
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 100)]
    batch: usize,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    #[arg(long, default_value_t = 16)]
    topics: usize,
    /// Herald nodes the connections are spread over (more than 1: a
    /// cluster, with Redis, on one PostgreSQL).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Events of the lone publisher, one at a time at --lone-rate (0: skip).
    #[arg(long, default_value_t = 1000)]
    lone_events: u64,
    #[arg(long, default_value_t = 100.0)]
    lone_rate: f64,
}

#[derive(Args, Clone)]
struct PruneArgs {
    /// One-shot topics published and pruned first: the baseline.
    #[arg(long, default_value_t = 10, value_parser = topic_count())]
    small: u64,
    /// One-shot topics published and pruned next.
    #[arg(long, default_value_t = 10_000, value_parser = topic_count())]
    large: u64,
    /// Idle prune passes averaged after each (and after each vacuum).
    #[arg(
        long,
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=prune::MAX_PASSES),
    )]
    passes: u64,
    /// Also vacuum the event log between the two phases, as autovacuum
    /// would once the first topics are gone.
    #[arg(long)]
    vacuum_after_small: bool,
}

#[derive(Args, Clone)]
struct PresenceArgs {
    /// Members (distinct users) joining, spread over the 2 nodes.
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    /// Over how long they join, evenly spaced.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Queries timed per kind (count, page) and room.
    #[arg(long, default_value_t = 200)]
    queries: usize,
}

#[derive(Args, Clone)]
struct ShardsArgs {
    /// Topics, each watched and published to (with history and without).
    #[arg(long, default_value_t = 10_000)]
    topics: usize,
    /// Events per topic and kind.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Skip killing a master.
    #[arg(long)]
    no_failover: bool,
}

/// `--small` and `--large`: at least one topic, at most
/// [`prune::MAX_TOPICS`].
fn topic_count() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=prune::MAX_TOPICS)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::Echo { bind } = cli.command {
        return Ok(echo::run(bind)?);
    }
    client::base();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let paths = paths(&cli.setup)?;
    let mut systems = Vec::new();
    for name in &cli.setup.systems {
        systems.push(match name.as_str() {
            "herald" => System::Herald,
            "socketio" => System::SocketIo,
            other => bail!("--systems: unknown system {other:?} (herald, socketio)"),
        });
    }
    if systems.contains(&System::SocketIo) {
        prepare_socketio(&paths).await?;
    }
    raise_fd_limit();
    let smoke = matches!(cli.command, Command::Smoke);
    let plan = match cli.command {
        Command::All => Plan {
            fanout: Some(FanoutArgs {
                subscribers: 10_000,
                rate: 50_000,
                seconds: 20.0,
                overload_rate: 200_000,
                topics: 1,
                nodes: 2,
                sweep: vec![1_000, 5_000, 10_000],
                sweep_rate: 40_000,
                sse: true,
            }),
            latency: Some(LatencyArgs {
                events: 1000,
                rate: 100.0,
            }),
            connections: Some(ConnectionsArgs {
                connections: 15_000,
                shared_topic: false,
                sse: true,
            }),
            publish: Some(PublishArgs {
                seconds: 10.0,
                batch: 100,
                connections: 64,
                topics: 64,
                nodes: 1,
                lone_events: 1000,
                lone_rate: 100.0,
            }),
            prune: Some(PruneArgs {
                small: 10,
                large: 10_000,
                passes: 10,
                vacuum_after_small: false,
            }),
            presence: Some(PresenceArgs {
                members: 10_000,
                seconds: 10.0,
                queries: 200,
            }),
            shards: Some(ShardsArgs {
                topics: 10_000,
                rounds: 2,
                no_failover: false,
            }),
        },
        Command::Smoke => Plan {
            fanout: Some(FanoutArgs {
                subscribers: 50,
                rate: 500,
                seconds: 2.0,
                overload_rate: 0,
                topics: 1,
                nodes: 2,
                sweep: Vec::new(),
                sweep_rate: 40_000,
                sse: true,
            }),
            latency: Some(LatencyArgs {
                events: 50,
                rate: 100.0,
            }),
            connections: Some(ConnectionsArgs {
                connections: 100,
                shared_topic: false,
                sse: true,
            }),
            publish: Some(PublishArgs {
                seconds: 1.0,
                batch: 10,
                connections: 4,
                topics: 4,
                nodes: 1,
                lone_events: 20,
                lone_rate: 100.0,
            }),
            prune: Some(PruneArgs {
                small: 10,
                large: 200,
                passes: 3,
                vacuum_after_small: false,
            }),
            presence: Some(PresenceArgs {
                members: 200,
                seconds: 1.0,
                queries: 5,
            }),
            shards: Some(ShardsArgs {
                topics: 200,
                rounds: 1,
                no_failover: false,
            }),
        },
        Command::Fanout(args) => Plan::only_fanout(args),
        Command::Latency(args) => Plan {
            latency: Some(args),
            ..Plan::default()
        },
        Command::Connections(args) => Plan {
            connections: Some(args),
            ..Plan::default()
        },
        Command::Publish(args) => Plan {
            publish: Some(args),
            ..Plan::default()
        },
        Command::Prune(args) => Plan {
            prune: Some(args),
            ..Plan::default()
        },
        Command::Presence(args) => Plan {
            presence: Some(args),
            ..Plan::default()
        },
        Command::Shards(args) => Plan {
            shards: Some(args),
            ..Plan::default()
        },
        Command::Echo { .. } => unreachable!("handled in main"),
    };
    let mut reports = Vec::new();
    let mut add = |report: Report| {
        println!("{}", report.json_line());
        reports.push(report);
    };

    if let Some(args) = &plan.fanout {
        // The echo server knows no topics: a floor for one topic only.
        let floor = args.topics == 1;
        let options = |subscribers, rate| fanout::Options {
            subscribers,
            rate,
            seconds: args.seconds,
            topics: args.topics,
            transport: Transport::WebSocket,
        };
        let mut runs = vec![(
            "fanout".to_owned(),
            floor,
            options(args.subscribers, args.rate),
        )];
        if args.overload_rate > 0 {
            runs.push((
                "fanout_overload".to_owned(),
                false,
                options(args.subscribers, args.overload_rate),
            ));
        }
        for &subscribers in &args.sweep {
            runs.push((
                format!("fanout_s{subscribers}"),
                floor,
                options(subscribers, args.sweep_rate),
            ));
        }
        if args.sse && systems.contains(&System::Herald) {
            // The same load as the first run, each subscriber on an SSE
            // stream: beside Herald's WebSocket run, not Socket.IO's.
            let sse = fanout::Options {
                transport: Transport::Sse,
                ..options(args.subscribers, args.rate)
            };
            runs.insert(1, ("fanout_sse".to_owned(), false, sse));
        }
        for (name, floor, options) in &runs {
            if *floor {
                // The floor: one process writing each event to every
                // socket, nothing else; its CPU per delivery is what one
                // loopback write costs here.
                let floor = Cluster::start(System::Echo, 1, false, &paths).await?;
                let result = fanout::run(name, &floor, options).await;
                floor.stop().await;
                add(or_error(name, System::Echo, result));
            }
            for &system in &systems {
                if options.transport == Transport::Sse && system != System::Herald {
                    continue;
                }
                let nodes = args.nodes.max(1);
                let cluster = Cluster::start(system, nodes, nodes > 1, &paths).await?;
                let result = fanout::run(name, &cluster, options).await;
                cluster.stop().await;
                add(or_error(name, system, result));
            }
        }
    }
    if let Some(args) = &plan.latency {
        let options = latency::Options {
            events: args.events,
            rate: args.rate,
        };
        let floor = Cluster::start(System::Echo, 1, false, &paths).await?;
        let result = latency::run("latency", latency::DURABLE, &floor, &options).await;
        floor.stop().await;
        let floor = or_error("latency", System::Echo, result);
        let floor_p = (floor.get("p50_ms"), floor.get("p99_ms"));
        add(floor);
        for &system in &systems {
            // Herald also without history: the relay path alone.
            let mut runs = vec![("latency", latency::DURABLE)];
            if system == System::Herald {
                runs.push(("latency_no_history", latency::VOLATILE));
            }
            let cluster = Cluster::start(system, 2, true, &paths).await?;
            for (name, topic) in runs {
                let result = latency::run(name, topic, &cluster, &options).await;
                let mut report = or_error(name, system, result);
                if let (Some(f50), Some(f99), Some(p50), Some(p99)) = (
                    floor_p.0,
                    floor_p.1,
                    report.get("p50_ms"),
                    report.get("p99_ms"),
                ) {
                    report.set("p50_above_floor_ms", p50 - f50);
                    report.set("p99_above_floor_ms", p99 - f99);
                }
                add(report);
            }
            cluster.stop().await;
        }
    }
    if let Some(args) = &plan.connections {
        let options = connections::Options {
            connections: args.connections,
            shared_topic: args.shared_topic,
            transport: Transport::WebSocket,
        };
        let mut runs = vec![(System::Herald, options)];
        if args.sse {
            let sse = connections::Options {
                transport: Transport::Sse,
                ..options
            };
            runs.push((System::Herald, sse));
        }
        runs.extend(
            systems
                .iter()
                .filter(|&&s| s != System::Herald)
                .map(|&s| (s, options)),
        );
        for (system, options) in runs {
            if !systems.contains(&system) {
                continue;
            }
            let cluster = Cluster::start(system, 1, true, &paths).await?;
            let result = connections::run(&cluster, &options).await;
            cluster.stop().await;
            add(or_error("connections", system, result));
        }
    }
    if let Some(args) = &plan.publish
        && systems.contains(&System::Herald)
    {
        let options = publish::Options {
            seconds: args.seconds,
            batch: args.batch,
            connections: args.connections,
            topics: args.topics,
            lone_events: args.lone_events,
            lone_rate: args.lone_rate,
        };
        let nodes = args.nodes.max(1);
        let cluster = Cluster::start(System::Herald, nodes, nodes > 1, &paths).await?;
        let result = publish::run(&cluster, &options).await;
        cluster.stop().await;
        match result {
            Ok(found) => found.into_iter().for_each(&mut add),
            Err(e) => add(or_error("publish", System::Herald, Err(e))),
        }
    }
    if let Some(args) = &plan.prune {
        if systems.contains(&System::Herald) {
            let options = prune::Options {
                small: args.small,
                large: args.large,
                passes: args.passes,
                vacuum_after_small: args.vacuum_after_small,
            };
            // One node, no Redis: a single node knows by itself who
            // watches a topic.
            let cluster =
                Cluster::start_with_env(System::Herald, 1, false, &paths, prune::NODE_ENV).await?;
            let result = prune::run(&cluster, &options).await;
            cluster.stop().await;
            add(or_error("prune", System::Herald, result));
        } else {
            eprintln!("herald-bench: prune measures Herald's pruner only; skipped (--systems)");
        }
    }
    if let Some(args) = &plan.presence {
        if systems.contains(&System::Herald) {
            let options = presence::Options {
                members: args.members,
                seconds: args.seconds,
                queries: args.queries,
            };
            let cluster =
                Cluster::start_with_env(System::Herald, 2, true, &paths, presence::NODE_ENV)
                    .await?;
            let result = presence::run(&cluster, &options).await;
            cluster.stop().await;
            add(or_error("presence", System::Herald, result));
        } else {
            eprintln!("herald-bench: presence measures Herald only; skipped (--systems)");
        }
    }
    if let Some(args) = &plan.shards {
        if systems.contains(&System::Herald) {
            let options = shards::Options {
                topics: args.topics,
                rounds: args.rounds,
            };
            // The same load on one Redis, then on a Redis Cluster.
            let one =
                Cluster::start_with_env(System::Herald, 2, true, &paths, shards::NODE_ENV).await?;
            let result = shards::spread("shards_one_redis", &one, false, &options).await;
            one.stop().await;
            add(or_error("shards_one_redis", System::Herald, result));
            let mut sharded = Cluster::start_sharded(2, &paths, shards::NODE_ENV).await?;
            let result = shards::spread("shards", &sharded, true, &options).await;
            add(or_error("shards", System::Herald, result));
            if !args.no_failover {
                let result = shards::failover(&mut sharded, &paths).await;
                add(or_error("shards_failover", System::Herald, result));
            }
            sharded.stop().await;
        } else {
            eprintln!("herald-bench: shards measures Herald only; skipped (--systems)");
        }
    }
    print!("{}", report::table(&reports));
    if reports.iter().any(|r| r.error.is_some()) {
        bail!("some runs did not complete; see the errors above");
    }
    // Light loads must lose nothing: the smoke run checks the harness and
    // the systems end to end (numbers are reported, never asserted).
    if smoke
        && let Some(r) = reports.iter().find(|r| {
            ["lost", "duplicated", "delivered_unacknowledged"]
                .iter()
                .any(|m| r.get(m).unwrap_or(0.0) > 0.0)
        })
    {
        bail!(
            "{} on {} lost, duplicated or invented deliveries",
            r.scenario,
            r.system.name()
        );
    }
    Ok(())
}

#[derive(Default)]
struct Plan {
    fanout: Option<FanoutArgs>,
    latency: Option<LatencyArgs>,
    connections: Option<ConnectionsArgs>,
    publish: Option<PublishArgs>,
    prune: Option<PruneArgs>,
    presence: Option<PresenceArgs>,
    shards: Option<ShardsArgs>,
}

impl Plan {
    fn only_fanout(args: FanoutArgs) -> Plan {
        Plan {
            fanout: Some(args),
            ..Plan::default()
        }
    }
}

fn or_error(name: &str, system: System, result: Result<Report>) -> Report {
    result.unwrap_or_else(|e| {
        let mut report = Report::new(name, system);
        report.error = Some(format!("{e:#}"));
        report
    })
}

fn paths(setup: &Setup) -> Result<Paths> {
    let herald_bin = match &setup.herald_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary without a folder")?
            .join("herald"),
    };
    if !herald_bin.exists() {
        bail!(
            "no herald binary at {} (build it with `cargo build --release`, or pass --herald-bin)",
            herald_bin.display()
        );
    }
    let work_dir = std::path::absolute(&setup.work_dir)?;
    Ok(Paths {
        herald_bin: std::path::absolute(herald_bin)?,
        socketio_dir: setup.socketio_dir.clone(),
        redis_server: setup.redis_server.clone(),
        postgres: setup.postgres.clone(),
        work_dir,
    })
}

/// Installs the Socket.IO node's packages (pinned by its package-lock.json)
/// into its own folder, once.
async fn prepare_socketio(paths: &Paths) -> Result<()> {
    if paths.socketio_dir.join("node_modules/socket.io").exists() {
        return Ok(());
    }
    eprintln!(
        "installing the Socket.IO node's packages in {}",
        paths.socketio_dir.display()
    );
    let status = tokio::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--prefix"])
        .arg(&paths.socketio_dir)
        .status()
        .await
        .context("cannot run npm (Node.js is needed for the Socket.IO comparison)")?;
    if !status.success() {
        bail!("npm ci in {} failed", paths.socketio_dir.display());
    }
    Ok(())
}

/// Raises this process's open-file limit to its hard limit; the nodes it
/// starts inherit it.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
