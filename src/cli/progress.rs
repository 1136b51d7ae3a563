//! Pull progress: bars on a terminal (one per layer, like `docker pull`), plain lines
//! otherwise, nothing with `--quiet`.

use std::sync::{Arc, Mutex};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::store::LayerEvent;

#[derive(Clone)]
pub enum Reporter {
    Quiet,
    Lines,
    Bars(MultiProgress),
}

impl Reporter {
    pub fn new(quiet: bool, tty: bool) -> Reporter {
        match (quiet, tty) {
            (true, _) => Reporter::Quiet,
            (false, false) => Reporter::Lines,
            (false, true) => {
                Reporter::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
            }
        }
    }

    pub fn line(&self, msg: &str) {
        match self {
            Reporter::Quiet => {}
            Reporter::Lines => eprintln!("{msg}"),
            Reporter::Bars(m) => {
                let _ = m.println(msg);
            }
        }
    }

    /// A callback for one layer's events, labelled `label` (a short digest).
    pub fn layer(&self, label: String, size: u64) -> Arc<dyn Fn(LayerEvent) + Send + Sync> {
        match self {
            Reporter::Quiet => Arc::new(|_| {}),
            Reporter::Lines => Arc::new(move |e| match e {
                LayerEvent::Cached => eprintln!("{label}: already exists"),
                LayerEvent::Started { resumed: 0, .. } => eprintln!("{label}: downloading"),
                LayerEvent::Started { resumed, .. } => {
                    eprintln!("{label}: resuming after {resumed} bytes")
                }
                LayerEvent::Retrying { attempt, reason } => {
                    eprintln!("{label}: retrying (attempt {attempt} failed: {reason})")
                }
                LayerEvent::Done => eprintln!("{label}: pull complete (verified, extracted)"),
                LayerEvent::Progress { .. } => {}
            }),
            Reporter::Bars(m) => {
                let bar = m.add(ProgressBar::new(size));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} {msg:<22} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(label);
                bar.set_message("waiting");
                let bar = Mutex::new(bar);
                Arc::new(move |e| {
                    let bar = bar.lock().expect("progress bar lock");
                    match e {
                        LayerEvent::Cached => {
                            bar.set_position(size);
                            bar.finish_with_message("already exists");
                        }
                        LayerEvent::Started { size: total, .. } => {
                            if total > 0 {
                                bar.set_length(total);
                            }
                            bar.set_position(0);
                            bar.set_message("downloading, verifying");
                        }
                        LayerEvent::Progress { n } => bar.inc(n),
                        LayerEvent::Retrying { attempt, .. } => {
                            bar.set_message(format!("retrying ({attempt})"))
                        }
                        LayerEvent::Done => bar.finish_with_message("pull complete"),
                    }
                })
            }
        }
    }
}
