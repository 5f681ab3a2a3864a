//! A shutdown signal shared by the poll loop and running jobs: SIGTERM/SIGINT (or a caller)
//! trips it; the loop stops receiving and jobs may stop early and release their message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    tx: Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Self { flag: Arc::new(AtomicBool::new(false)), tx: Arc::new(tx), rx }
    }

    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.tx.send(true);
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The flag itself, for blocking code (generation checks it between tokens).
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// The flag, shared, for work that outlives a borrow (the batching thread).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// Resolves once shutdown is triggered.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Trips on SIGTERM or SIGINT (Ctrl-C). The handlers are in place when this returns, so a
    /// signal that arrives at any later moment (during a model load, say) is a clean shutdown,
    /// not the default action of dying by the signal.
    pub fn on_signals(&self) {
        let me = self.clone();
        #[cfg(unix)]
        let handlers = {
            use tokio::signal::unix::{signal, SignalKind};
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        };
        tokio::spawn(async move {
            #[cfg(unix)]
            {
                let (Ok(mut term), Ok(mut int)) = handlers else {
                    tracing::warn!("could not install signal handlers; shutdown only by kill");
                    return;
                };
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: finishing or releasing in-flight jobs"),
                    _ = int.recv() => tracing::info!("SIGINT: finishing or releasing in-flight jobs (Ctrl-C again to quit now)"),
                }
                me.trigger();
                // A second signal quits at once, as a user pressing Ctrl-C twice expects: jobs
                // still running come back to the queue after their visibility timeout.
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                tracing::warn!(
                    "second signal: exiting now; unfinished jobs return to the queue after their visibility timeout"
                );
                std::process::exit(130);
            }
            #[cfg(not(unix))]
            {
                let _ = tokio::signal::ctrl_c().await;
                me.trigger();
            }
        });
    }
}
