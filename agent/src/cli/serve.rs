use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use tracing::{info, warn};

use super::{load_config, GlobalArgs};
use crate::context::Ctx;
use crate::lookup::BackupRef;
use crate::restore::reader::BackupReader;
use crate::restore::OpenBackup;
use crate::serve::nbd::{Export, Exports};
use crate::serve::{BackupExport, Listener, CACHE_BLOCKS};

/// Where `serve` listens when given no address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Backups to export: IMAGE (its latest) or IMAGE@ID, each under this
    /// name exactly; the first is also the default (empty-name) export.
    #[arg(required = true)]
    pub specs: Vec<String>,
    /// TCP address to listen on (default 127.0.0.1:10809; port 0 picks a free
    /// one, printed on stdout). NBD has no authentication: keep it on
    /// loopback or a trusted network.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Listen on this Unix socket (mode 0600). Given alone, no TCP port is
    /// opened.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
}

/// Serves the backups until SIGTERM or SIGINT.
pub fn run(g: &GlobalArgs, a: ServeArgs) -> Result<ExitCode> {
    let cfg = load_config(g)?;
    let ctx = Ctx::open(cfg)?;
    for (i, s) in a.specs.iter().enumerate() {
        if a.specs[..i].contains(s) {
            bail!("'{s}' is given twice: each backup is exported once, under the name given");
        }
    }
    // Each OpenBackup holds the store lock shared until the process exits:
    // a gc waits for the server to stop before it sweeps, so no chunk of a
    // served backup disappears under a client.
    let opened = a
        .specs
        .iter()
        .map(|spec| OpenBackup::open(&ctx, &BackupRef::parse(spec)?))
        .collect::<Result<Vec<_>>>()?;
    let mut backups = Vec::new();
    for (spec, b) in a.specs.iter().zip(&opened) {
        let reader = BackupReader::with_cache(&ctx.store, &b.manifest, CACHE_BLOCKS)?;
        let desc = format!("blockvault backup {} of image '{}' ({})", b.row.id, b.row.image, b.manifest.finished);
        backups.push((spec.clone(), &b.row, BackupExport::new(reader, desc)));
    }
    let exports = Exports::new(backups.iter().map(|(s, _, e)| (s.clone(), e as &dyn Export)).collect());

    let mut listeners = Vec::new();
    if a.listen.is_some() || a.unix.is_none() {
        let addr = a.listen.unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("a valid address"));
        let t = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        let bound = t.local_addr().with_context(|| format!("the address of the socket bound to {addr}"))?;
        if !bound.ip().is_loopback() {
            warn!(%bound, "NBD has no authentication or encryption: anyone who reaches this address reads the backups");
        }
        println!("listening on {bound}");
        listeners.push(Listener::Tcp(t));
    }
    let mut socket_path = None;
    if let Some(p) = &a.unix {
        listeners.push(Listener::Unix(bind_unix(p)?));
        println!("listening on unix:{}", p.display());
        socket_path = Some(p.clone());
    }
    for (spec, row, e) in &backups {
        println!("export '{spec}': backup {} of image '{}', {} bytes", row.id, row.image, e.size());
    }
    info!(exports = backups.len(), "serving; gc waits until this server stops");
    stop_on_signal(socket_path)?;
    crate::serve::serve(&exports, listeners)?;
    Ok(ExitCode::SUCCESS)
}

/// Binds a Unix socket at `path`, private to the owner. A stale socket left
/// by a server that was killed is replaced; a live one, or anything that is
/// not a socket, is refused.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            bail!("{} exists and is not a socket: refusing to replace it", path.display());
        }
        if UnixStream::connect(path).is_ok() {
            bail!("{}: another server is listening on this socket", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    // no window in which another user could connect: created 0600 (the
    // umask is process-wide, and no other thread runs yet)
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let l = UnixListener::bind(path);
    rustix::process::umask(old);
    l.with_context(|| format!("listening on the Unix socket {}", path.display()))
}

/// On SIGTERM or SIGINT: removes the Unix socket and exits 0. Clients are
/// cut off; they only read, so nothing is left half-done.
fn stop_on_signal(socket: Option<PathBuf>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the signal handler")?;
    // the handlers are installed here, before serving starts
    let (mut term, mut int) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, std::io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
    })?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        if let Some(p) = socket {
            let _ = std::fs::remove_file(p);
        }
        info!("stopping on signal");
        std::process::exit(0);
    })?;
    Ok(())
}
