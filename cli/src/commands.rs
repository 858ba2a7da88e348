//! The subcommands: each resolves its inputs, calls the libraries, and prints the result.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use kof_floxhub::resolve::ResolvedEnvironment;
use kof_lazy::prepare::{PrepareError, Preparer, Root};
use kof_nar::StorePath;
use kof_node_api::envref::EnvRef;
use kof_store::{FetchStateKind, Store};
use kof_substituter::fetcher::FetchEvent;
use serde_json::json;

use crate::context::Context;
use crate::progress::{human_bytes, Progress};
use crate::{Cli, Command};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let ctx = Context::load(cli.config, cli.store)?;
    match cli.command {
        Command::Prefetch { refs } => prefetch(&ctx, &refs),
        Command::Resolve { reference, json } => resolve(&ctx, &reference, json),
        Command::Ls { json } => ls(&ctx, json),
        Command::Stats { json } => stats(&ctx, json),
        Command::Verify => verify(&ctx),
        Command::Export { store_path, dir } => export(&ctx, &store_path, &dir),
        Command::DumpNar { store_path } => dump_nar(&ctx, &store_path),
        Command::Forget { reference } => forget(&ctx, &reference),
        Command::Gc { json } => gc(&ctx, json),
        Command::Run { reference, cmd } => crate::run::run(&ctx, &reference, &cmd),
        Command::SandboxInit { spec } => crate::sandbox::init_main(&spec),
        Command::Profile { command } => crate::profile::run(&ctx, command),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn parse_refs(refs: &[String]) -> Result<Vec<EnvRef>> {
    refs.iter()
        .map(|r| EnvRef::parse(r).map_err(anyhow::Error::from))
        .collect()
}

fn parse_store_path(s: &str) -> Result<StorePath> {
    StorePath::parse(s).with_context(|| format!("store path {s:?}"))
}

fn prefetch(ctx: &Context, refs: &[String]) -> Result<()> {
    let parsed = parse_refs(refs)?;
    if let Some(mut client) = crate::daemon_client::connect(ctx) {
        return crate::daemon_client::prefetch(ctx, &mut client, refs);
    }
    let refs = parsed;
    let start = Instant::now();
    let store = Arc::new(ctx.open_store()?);
    let rt = runtime()?;
    let _guard = rt.enter();
    let prep = Arc::new(Preparer::from_config(&ctx.config, store).map_err(report)?);
    let fetcher = prep.fetcher();
    rt.block_on(async {
        // Every reference resolved concurrently (each runs git).
        let tasks: Vec<_> = refs
            .iter()
            .map(|r| {
                let (prep, r) = (prep.clone(), r.clone());
                tokio::spawn(async move { prep.resolve(&r, None).await })
            })
            .collect();
        let mut envs = Vec::new();
        for t in tasks {
            envs.push(t.await.context("resolver task")?.map_err(report)?);
        }
        // One closure walk and one fetch for all environments, so shared paths are fetched once.
        let roots: BTreeSet<StorePath> = envs.iter().flat_map(|e| e.roots.clone()).collect();
        let roots: Vec<StorePath> = roots.into_iter().collect();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<FetchEvent>();
        let render = tokio::spawn(async move {
            let mut progress = Progress::new();
            while let Some(ev) = rx.recv().await {
                progress.event(&ev);
            }
            progress.finish();
        });
        // Downloads start while the closure walk is still going.
        let result = fetcher.fetch_closure(&roots, Some(tx)).await;
        let _ = render.await;
        let summary = result.with_context(|| format!("prefetching {}", names(&envs)))?;
        // Each environment's own closure, from the stored references, for its record.
        for env in &envs {
            let own = fetcher
                .resolve(&env.roots)
                .await
                .with_context(|| format!("computing the closure of {}", env.env_ref()))?;
            prep.record(env, &own, Root::Keep).await.map_err(report)?;
            println!(
                "{}/{} generation {} ({}): {} store paths",
                env.owner,
                env.name,
                env.generation,
                env.system,
                own.entries.len()
            );
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "prefetched {} paths ({} fetched, {} already present): downloaded {}, {} new to the store, NAR {}, in {:.2} s",
            summary.paths,
            summary.paths_fetched,
            summary.paths_already_present,
            human_bytes(summary.bytes_downloaded),
            human_bytes(summary.new_stored_bytes),
            human_bytes(summary.nar_bytes),
            secs
        );
        Ok(())
    })
}

/// A pipeline error as the command's error: the whole chain, which names the environment.
pub(crate) fn report(e: PrepareError) -> anyhow::Error {
    anyhow::anyhow!(kof_node_api::report::chain(&e))
}

fn names(envs: &[ResolvedEnvironment]) -> String {
    envs.iter()
        .map(|e| format!("{}:{}", e.env_ref(), e.generation))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `kof-store resolve`: through the daemon when it answers (it is the store's one writer, and
/// the generation is recorded there), else alone through the same pipeline.
fn resolve(ctx: &Context, reference: &str, as_json: bool) -> Result<()> {
    let r = EnvRef::parse(reference)?;
    let env = match crate::daemon_client::connect(ctx) {
        Some(mut client) => {
            let env = client
                .resolve(reference, None)
                .with_context(|| format!("resolving {r} through kof-fetcherd"))?;
            tracing::info!(env = %r, generation = env.generation, "resolved through kof-fetcherd");
            env
        }
        None => {
            let store = Arc::new(ctx.open_store()?);
            let rt = runtime()?;
            let _guard = rt.enter();
            let prep = Preparer::from_config(&ctx.config, store).map_err(report)?;
            rt.block_on(prep.describe(&r, None)).map_err(report)?
        }
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&env)?);
        return Ok(());
    }
    println!(
        "{}/{} generation {}{} ({}), live {}, newest {}",
        env.owner,
        env.name,
        env.generation,
        if env.pinned { " (pinned)" } else { "" },
        env.system,
        env.live_generation,
        env.newest_generation
    );
    println!(
        "closure: {} paths, {} NAR",
        env.closure.len(),
        human_bytes(env.closure_nar_size)
    );
    for p in &env.closure {
        println!("  {p}");
    }
    for (k, v) in &env.vars {
        println!("var {k}={v}");
    }
    if let Some(h) = &env.hook {
        println!("on-activate hook: {} lines", h.lines().count());
    }
    Ok(())
}

fn ls(ctx: &Context, as_json: bool) -> Result<()> {
    let store = ctx.open_store()?;
    let paths = store.list_paths().context("listing stored paths")?;
    let mut out = std::io::stdout().lock();
    if as_json {
        let v: Vec<_> = paths
            .iter()
            .map(|p| {
                json!({
                    "path": p.store_path.to_absolute(),
                    "nar_hash": p.nar_hash.to_nix_string(),
                    "nar_size": p.nar_size,
                    "references": p.references.iter().map(|r| r.to_absolute()).collect::<Vec<_>>(),
                    "deriver": p.deriver,
                    "source_cache": p.source_cache,
                    "registered_at": p.registered_at,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        for p in &paths {
            writeln!(out, "{}\t{}", p.store_path, p.nar_size)?;
        }
    }
    Ok(())
}

fn stats(ctx: &Context, as_json: bool) -> Result<()> {
    let store = ctx.open_store()?;
    let s = store.stats().context("reading store totals")?;
    let history = store.gc_history().context("reading the gc runs")?;
    // Fetch rows whose process is gone read as interrupted (`fetches_unfinished` counts them
    // with the fetches under way).
    let fetches = store.fetch_states().context("reading fetch state")?;
    let interrupted = fetches
        .iter()
        .filter(|f| f.state == FetchStateKind::Interrupted)
        .count();
    if as_json {
        let mut v = serde_json::to_value(&s)?;
        v["gc"] = serde_json::to_value(&history)?;
        v["fetches_interrupted"] = json!(interrupted);
        v["fetches"] = fetches
            .iter()
            .map(|f| {
                json!({
                    "path": f.store_path.to_absolute(),
                    "state": f.state,
                    "source": f.source,
                    "error": f.error,
                    "attempts": f.attempts,
                    "pid": f.pid,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let ratio = if s.stored_bytes > 0 {
            s.logical_bytes as f64 / s.stored_bytes as f64
        } else {
            0.0
        };
        println!("store paths:   {}", s.store_paths);
        println!("environments:  {}", s.environments);
        println!(
            "logical bytes: {} (sum of NarSize)",
            human_bytes(s.logical_bytes)
        );
        println!(
            "unique bytes:  {} (distinct objects, uncompressed)",
            human_bytes(s.unique_bytes)
        );
        println!(
            "stored bytes:  {} on disk in {} objects",
            human_bytes(s.stored_bytes),
            s.objects
        );
        println!("saving:        {ratio:.2}x");
        print_gc_history(&history);
        if !fetches.is_empty() {
            println!(
                "fetches:       {} under way, {} interrupted (their process is gone), {} failed",
                s.fetches_unfinished as usize - interrupted.min(s.fetches_unfinished as usize),
                interrupted,
                s.fetches_failed
            );
            for f in fetches {
                println!(
                    "  {:?} {} from {}{}",
                    f.state,
                    f.store_path,
                    f.source,
                    f.error.map(|e| format!(": {e}")).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn verify(ctx: &Context) -> Result<()> {
    let store = ctx.open_store()?;
    let report = store.verify().context("verifying the store")?;
    // Nix's closure rule: a stored path whose reference is not stored.
    for d in &report.dangling_references {
        eprintln!(
            "missing reference: {} references {}, which is not stored",
            d.path.to_absolute(),
            d.reference.to_absolute()
        );
    }
    if let (Some(d), true) = (
        report.dangling_references.first(),
        report.problems.is_empty(),
    ) {
        bail!(
            "verify found {} stored path reference(s) that are not stored; first: {} references {}",
            report.dangling_references.len(),
            d.path.to_absolute(),
            d.reference.to_absolute()
        );
    }
    if report.is_ok() {
        println!(
            "verified {} objects and {} chunked files: no corruption",
            report.objects_checked, report.files_checked
        );
        return Ok(());
    }
    for c in &report.problems {
        let paths: Vec<String> = c.store_paths.iter().map(|p| p.to_absolute()).collect();
        eprintln!(
            "corrupt {:?}: {} (in {})",
            c.item,
            c.reason,
            paths.join(", ")
        );
    }
    let first = &report.problems[0];
    bail!(
        "verify found {} corrupt item(s); first: {:?}: {} in {}",
        report.problems.len(),
        first.item,
        first.reason,
        first
            .store_paths
            .iter()
            .map(|p| p.to_absolute())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn export(ctx: &Context, store_path: &str, dir: &Path) -> Result<()> {
    let p = parse_store_path(store_path)?;
    let store = ctx.open_store()?;
    store
        .export(&p, dir)
        .with_context(|| format!("exporting {p} to {}", dir.display()))?;
    Ok(())
}

fn dump_nar(ctx: &Context, store_path: &str) -> Result<()> {
    let p = parse_store_path(store_path)?;
    let store = ctx.open_store()?;
    let stdout = std::io::stdout().lock();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout);
    store
        .dump_nar(&p, &mut out)
        .with_context(|| format!("dumping the NAR of {p}"))?;
    out.flush().context("writing the NAR to stdout")?;
    Ok(())
}

fn forget(ctx: &Context, reference: &str) -> Result<()> {
    let r = parse_refs(&[reference.to_string()])?.remove(0);
    let store = ctx.open_store()?;
    let roots = store.roots().context("listing kept environments")?;
    let mut removed = 0;
    for root in roots
        .iter()
        .filter(|k| k.owner == r.owner && k.name == r.name)
        .filter(|k| r.generation.is_none_or(|g| g == k.generation))
    {
        if store
            .remove_root(&root.owner, &root.name, root.generation)
            .with_context(|| format!("forgetting {r}"))?
        {
            println!("forgot {}/{}:{}", root.owner, root.name, root.generation);
            removed += 1;
        }
    }
    if removed == 0 {
        bail!("{r} is not kept in this store");
    }
    Ok(())
}

/// The `gc` lines of `kof-store stats`: the last run (when, why, what it freed) and totals.
fn print_gc_history(h: &kof_store::GcHistory) {
    let Some(last) = &h.last else {
        println!("gc:            never run");
        return;
    };
    let ago = (now_secs() - last.finished_at).max(0);
    println!(
        "last gc:       {} s ago ({}), {} paths, {} freed + {} derived data, in {} s",
        ago,
        last.trigger,
        last.paths_removed,
        human_bytes(last.bytes_freed),
        human_bytes(last.derived_bytes_freed),
        (last.finished_at - last.started_at).max(0)
    );
    let by: Vec<String> = h
        .runs_by_trigger
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    println!(
        "gc totals:     {} runs ({}), {} paths, {} freed + {} derived data",
        h.runs,
        by.join(", "),
        h.paths_removed,
        human_bytes(h.bytes_freed),
        human_bytes(h.derived_bytes_freed)
    );
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `kof-store gc`: through the daemon when it answers (it collects while it serves), else
/// alone, which needs the store to itself.
fn gc(ctx: &Context, as_json: bool) -> Result<()> {
    if let Some(mut client) = crate::daemon_client::connect(ctx) {
        let done = client
            .gc(false)
            .context("collecting garbage through kof-fetcherd")?;
        if as_json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "paths_removed": done.paths_removed,
                    "objects_removed": done.objects_removed,
                    "bytes_freed": done.bytes_freed,
                    "derived_bytes_freed": done.derived_bytes_freed,
                    "elapsed_secs": done.elapsed_secs,
                    "store_bytes_before": done.store_bytes_before,
                    "store_bytes_after": done.store_bytes_after,
                    "through": "kof-fetcherd",
                }))?
            );
        } else {
            for p in &done.paths_removed {
                println!("removed {p}");
            }
            println!(
                "gc: removed {} paths and {} objects, freed {} (store {} -> {}) in {:.2} s (through kof-fetcherd)",
                done.paths_removed.len(),
                done.objects_removed,
                human_bytes(done.bytes_freed + done.derived_bytes_freed),
                human_bytes(done.store_bytes_before),
                human_bytes(done.store_bytes_after),
                done.elapsed_secs
            );
        }
        return Ok(());
    }
    let store: Store = ctx.open_store()?;
    let started_at = now_secs();
    let report = store.gc().context("collecting garbage")?;
    store
        .record_gc_run(&kof_store::GcRun::of(
            kof_store::GcTrigger::Manual,
            started_at,
            &report,
            0,
        ))
        .context("recording the gc run")?;
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "paths_removed": report.paths_removed.iter().map(|p| p.to_absolute()).collect::<Vec<_>>(),
                "objects_removed": report.objects_removed,
                "orphans_removed": report.orphans_removed,
                "bytes_freed": report.bytes_freed,
            }))?
        );
    } else {
        for p in &report.paths_removed {
            println!("removed {p}");
        }
        println!(
            "gc: removed {} paths and {} objects, freed {}",
            report.paths_removed.len(),
            report.objects_removed + report.orphans_removed,
            human_bytes(report.bytes_freed)
        );
    }
    Ok(())
}
