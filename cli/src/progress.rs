//! Progress bars for push and restore, shown only when stderr is a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Bar(Option<ProgressBar>);

impl Bar {
    pub fn bytes(total: Option<u64>, what: &str) -> Bar {
        if !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template(&format!(
                    "{what} {{bar:30}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}} {{msg}}"
                ))
                .expect("valid template"),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template(&format!(
                    "{what} {{spinner}} {{bytes}} {{bytes_per_sec}} {{msg}}"
                ))
                .expect("valid template"),
            ),
        };
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Bar(Some(bar))
    }

    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl cairn_store::push::PushProgress for Bar {
    fn bytes_read(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
    fn file_done(&self, _size: u64) {}
}

impl cairn_store::restore::RestoreProgress for Bar {
    fn bytes_written(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
}
