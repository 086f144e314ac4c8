use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio_util::sync::CancellationToken;
use tracing::info;

use podlease::cli::{Cli, Commands, LogArgs, LogFormat, RunArgs};
use std::time::Duration;

use podlease::controller::{self, Settings};
use podlease::leader::LeaderConfig;
use podlease::registry::RegistryConfig;

fn init_logging(log: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.log_level).unwrap_or_else(|e| {
        eprintln!("podlease: invalid --log-level {:?}: {e}; using info", log.log_level);
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Commands::Crd => {
            print!("{}", podlease::registration::crd_yaml());
            Ok(())
        }
        Commands::Get(args) => {
            init_logging(&cli.log);
            podlease::get::run(args).await
        }
        Commands::Run(args) => {
            init_logging(&cli.log);
            run(args).await
        }
        Commands::Doctor(args) => {
            init_logging(&cli.log);
            let client = kube_client(&args.run).await;
            std::process::exit(podlease::doctor::run(args, client).await)
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube_client(&args).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    let pod_name = std::env::var("POD_NAME").ok().filter(|n| !n.is_empty());
    let instance = pod_name.clone().or_else(|| std::env::var("HOSTNAME").ok()).unwrap_or_else(|| "podlease".into());
    // The pod name is unique while the pod lives, and a restarted container keeps it: it
    // takes its Lease back at once. Without one, a random suffix keeps identities apart.
    let identity = pod_name.unwrap_or_else(|| format!("{instance}_{:08x}", rand::random::<u32>()));
    let namespace = args.leader_election_namespace.clone().or_else(|| std::env::var("POD_NAMESPACE").ok()).unwrap_or_else(|| "default".into());
    // One key segment, checked like the flag.
    let install_id = match &args.install_id {
        Some(id) => id.clone(),
        None => podlease::cli::parse_install_id(&format!("{namespace}.{}", args.leader_election_name)).map_err(anyhow::Error::msg)?,
    };
    let leader = args.leader_elect.then(|| {
        LeaderConfig::new(
            namespace.clone(),
            args.leader_election_name.clone(),
            identity.clone(),
            Duration::from_secs(args.leader_lease_duration.max(2)),
        )
    });
    let mut defaults = args.defaults().map_err(anyhow::Error::msg)?;
    defaults.failover = leader.as_ref().map(LeaderConfig::worst_failover);
    if let Some(why) = defaults.failover.and_then(|f| podlease::leader::short_ttl(args.default_ttl, f)) {
        tracing::warn!(default_ttl = args.default_ttl, leader_lease_duration = args.leader_lease_duration, "--default-ttl: {why}");
    }
    let implicit = defaults.prefix.clone().unwrap_or_else(|| defaults.format.layout().default_prefix().parse().expect("valid"));
    if let Err(e) = defaults.key_space.permit(defaults.format, &implicit) {
        tracing::warn!("annotated pods without podlease.io/prefix will be refused: {e}");
    }
    let watch_namespaces: Vec<String> = args.watch_namespace.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
    let settings = Settings {
        defaults,
        etcd: args.etcd.config(),
        registry: RegistryConfig {
            owner_prefix: args.owner_prefix.as_str().to_string(),
            install_id,
            namespaces: watch_namespaces.clone(),
            call_timeout: args.etcd.config().call_timeout,
            concurrency: args.concurrency.max(1),
            lease_pool_size: args.lease_pool_size,
            pooled_ttls: vec![args.default_ttl],
            verify_interval: Duration::from_secs(args.verify_interval.max(1)),
            identity,
            revoke_on_shutdown: args.revoke_on_shutdown,
            ..Default::default()
        },
        cluster_id: args.cluster_id.clone(),
        namespaces: watch_namespaces,
        migrate_from: args.migrate_from.as_ref().map(|p| p.as_str().to_string()),
        metrics_addr: args.metrics_addr,
        instance,
        leader,
    };
    controller::run(client, settings, shutdown).await
}

async fn kube_client(args: &RunArgs) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// SIGTERM or SIGINT: stop without revoking (the next leader adopts the leases).
async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    shutdown.cancel();
}
