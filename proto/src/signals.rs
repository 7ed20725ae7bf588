//! Catching the signals that stop chatd and chat-server.
//!
//! Both must catch them before they tell anyone they are up (a line on
//! standard output, READY=1, a control socket): a SIGTERM sent right after
//! that must stop them cleanly, not kill them. So catching starts when
//! [`catch`] is called, and a signal that comes before its future is
//! awaited is kept for it.

use std::future::Future;

/// Starts catching SIGTERM and SIGINT (Ctrl-C on Windows); call it inside
/// a tokio runtime. The future gives the name of the first to come.
pub fn catch() -> std::io::Result<impl Future<Output = &'static str> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        })
    }
    #[cfg(windows)]
    {
        let mut ctrl_c = tokio::signal::windows::ctrl_c()?;
        Ok(async move {
            ctrl_c.recv().await;
            "Ctrl-C"
        })
    }
}

#[cfg(all(test, unix))]
mod tests {
    #[tokio::test]
    async fn a_signal_before_the_wait_is_kept_for_it() {
        let stop = super::catch().expect("signals can be caught");
        // SAFETY: raise only sends this process a signal, which the
        // handler installed above takes instead of the default action.
        let raised = unsafe { libc::raise(libc::SIGINT) };
        assert_eq!(raised, 0);
        assert_eq!(stop.await, "SIGINT");
    }
}
