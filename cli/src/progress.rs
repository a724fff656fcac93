//! Progress bars for push, restore and gc, shown only when stderr is a terminal.

use std::io::IsTerminal;

use std::sync::Mutex;

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

/// One bar per phase of a multi-phase command (gc): a count towards a total where the phase
/// has one, a spinner where it has not.
pub struct Phases {
    what: &'static str,
    bar: Mutex<Option<ProgressBar>>,
    terminal: bool,
}

impl Phases {
    pub fn new(what: &'static str) -> Phases {
        Phases { what, bar: Mutex::new(None), terminal: std::io::stderr().is_terminal() }
    }

    pub fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

impl cairn_gc::GcProgress for Phases {
    fn phase(&self, name: &str, total: Option<u64>) {
        tracing::info!("{}: {name}", self.what);
        if !self.terminal {
            return;
        }
        let what = self.what;
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template(&format!(
                    "{what} {name} {{bar:30}} {{pos}}/{{len}} {{elapsed}}"
                ))
                .expect("valid template"),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template(&format!("{what} {name} {{spinner}} {{elapsed}}"))
                    .expect("valid template"),
            ),
        };
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        if let Some(old) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).replace(bar) {
            old.finish_and_clear();
        }
    }

    fn advance(&self, n: u64) {
        if let Some(b) = &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
            b.inc(n);
        }
    }
}
