//! The one shutdown signal: SIGINT or SIGTERM, as a future passed down to whoever must stop.

use std::future::Future;

/// Listens for the first SIGINT (Ctrl-C) or SIGTERM from the moment it is called, and
/// resolves once one has arrived (also when it came before the future was first polled).
///
/// Call it inside the runtime (`Runtime::enter`) before anything starts: a signal listener
/// registered only when the future is first polled would leave a window at startup in which
/// SIGTERM kills the process with the default action instead of stopping it — after the
/// consumer has joined its group, a member the broker keeps until its session times out.
pub fn signal() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Not registrable (no runtime, or the signal is unavailable): never resolves; the
        // default action still applies.
        let mut interrupt = signal(SignalKind::interrupt()).ok();
        let mut term = signal(SignalKind::terminate()).ok();
        async move {
            let interrupt = async {
                match interrupt.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = interrupt => {}
                () = term => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
