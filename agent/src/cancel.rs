//! Cancellation by the operator: SIGTERM and SIGINT set a flag that the
//! backup pipeline checks, so an interrupted backup fails cleanly (nothing
//! committed, temp files and its RBD snapshot removed, its catalog row
//! marked failed) instead of dying with its work half done. Shared by
//! `backup` and `run`; the daemon has its own loop over the same signals.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::warn;

/// A flag that the first SIGTERM or SIGINT sets, from a small signal
/// thread. The handlers are registered before this returns, so a signal
/// that arrives during the backup is never lost (nor fatal).
pub fn on_signals() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let setup = rt.and_then(|rt| {
        let sigs = rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            Ok::<_, std::io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
        })?;
        Ok((rt, sigs))
    });
    match setup {
        Ok((rt, (mut term, mut int))) => {
            std::thread::spawn(move || {
                rt.block_on(async {
                    tokio::select! {
                        _ = term.recv() => warn!("SIGTERM: cancelling the backup in progress"),
                        _ = int.recv() => warn!("SIGINT: cancelling the backup in progress"),
                    }
                });
                // tokio's handlers stay installed for the life of the
                // process: a second signal does not kill the cleanup
                f.store(true, Ordering::Relaxed);
            });
        }
        Err(e) => warn!(error = %e, "cannot handle signals; SIGTERM will kill backups without cleanup"),
    }
    flag
}
