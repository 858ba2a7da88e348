//! `kof-store` through the node daemon: when `kof-fetcherd` answers on the configured socket
//! and owns the same store, `prefetch` asks it to fetch (so the daemon's in-flight fetches
//! and the command's are shared, and the store has one writer); otherwise the command works
//! alone.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};
use kof_node_api::api::{ApiError, Client, ErrorKind};

use crate::context::Context;
use crate::progress::human_bytes;

/// A client of the daemon, when one answers on the socket and owns this command's store.
pub fn connect(ctx: &Context) -> Option<Client> {
    let socket = &ctx.config.socket;
    let mut client = Client::connect(socket).ok()?;
    let store_dir = match client.hello() {
        Ok(h) => Ok(h.store_dir),
        // A daemon older than `hello`.
        Err(ApiError::Remote(e)) if e.kind == ErrorKind::BadRequest => {
            client.status().map(|s| s.store_dir)
        }
        Err(e) => Err(e),
    };
    let store_dir = match store_dir {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(socket = %socket.display(), error = %kof_node_api::report::chain(&e),
                "kof-fetcherd answers but not to hello or status; working alone");
            return None;
        }
    };
    if !same_dir(&store_dir, &ctx.config.store_dir) {
        tracing::info!(
            daemon_store = %store_dir.display(),
            store = %ctx.config.store_dir.display(),
            "kof-fetcherd owns another store; working alone"
        );
        return None;
    }
    Some(client)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// `kof-store prefetch` through the daemon: one request per reference, in order (a path
/// shared by two environments is fetched once: the second finds it stored).
pub fn prefetch(ctx: &Context, client: &mut Client, refs: &[String]) -> Result<()> {
    let start = Instant::now();
    let (mut paths, mut fetched, mut present, mut downloaded, mut new_bytes, mut nar) =
        (0, 0, 0, 0, 0, 0);
    for r in refs {
        let p = client
            .prefetch(r, None)
            .with_context(|| format!("prefetching {r} through kof-fetcherd"))?;
        println!(
            "{} generation {} ({}): {} store paths",
            p.env, p.generation, ctx.config.system, p.paths
        );
        paths += p.paths;
        fetched += p.paths_fetched;
        present += p.paths_already_present;
        downloaded += p.bytes_downloaded;
        new_bytes += p.new_stored_bytes;
        nar += p.nar_bytes;
    }
    println!(
        "prefetched {} paths ({} fetched, {} already present): downloaded {}, {} new to the store, NAR {}, in {:.2} s (through kof-fetcherd)",
        paths,
        fetched,
        present,
        human_bytes(downloaded),
        human_bytes(new_bytes),
        human_bytes(nar),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
