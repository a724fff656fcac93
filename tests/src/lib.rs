//! Helpers for the integration tests: run the real `cairn` binary, start a real moto S3
//! server on 127.0.0.1, build source trees with every kind of file, and compare trees.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `cairn` binary built by `cargo build --workspace --bins` (scripts/test.sh does that).
pub fn cairn_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let bin = dir.join("cairn");
    assert!(bin.exists(), "{} not found: run `cargo build --workspace --bins` first", bin.display());
    bin
}

/// A repository plus the environment the binary runs with.
pub struct Repo {
    pub url: String,
    pub cache: tempfile::TempDir,
    pub env: Vec<(String, String)>,
}

impl Repo {
    pub fn local(dir: &Path) -> Repo {
        Repo { url: dir.to_string_lossy().into_owned(), cache: tempfile::tempdir().unwrap(), env: vec![] }
    }

    pub fn s3(moto: &Moto, bucket: &str) -> Repo {
        moto.create_bucket(bucket);
        Repo { url: format!("s3://{bucket}/repo"), cache: tempfile::tempdir().unwrap(), env: moto.env() }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cairn_bin());
        c.args(args).env("CAIRN_REPO", &self.url).env("CAIRN_CACHE_DIR", self.cache.path());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "cairn {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run cairn")
    }

    /// Push and return the new snapshot id (the last line of stdout).
    pub fn push(&self, dir: &Path, extra: &[&str]) -> String {
        let mut args = vec!["push", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.ok(&args);
        out.lines().last().expect("snapshot id line").trim().to_string()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("valid JSON")
    }
}

/// A port no other test of this process was given: tests run in parallel threads, and a port
/// the kernel calls free can be handed out twice between `bind` and the server's own bind.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn http_answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 5];
    s.read_exact(&mut head).is_ok() && &head == b"HTTP/"
}

/// A moto S3 server on a free port of 127.0.0.1, killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// Start moto on a free port. Ready means it answered an HTTP request: a bare TCP connect
    /// can succeed against nothing (a client socket connecting to its own ephemeral port),
    /// and then moto finds its port taken and exits; so a start that fails is retried on
    /// another port.
    pub fn start() -> Moto {
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto_server not found: run scripts/setup.sh (pip install 'moto[server]')");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if http_answers(port) {
                    return Moto { child, port };
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("moto_server did not start (5 attempts on different ports)");
    }

    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// moto accepts an unsigned PUT of a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A tree with every kind of entry and metadata Cairn must keep.
pub fn make_rich_tree(root: &Path) {
    use std::fs;
    fs::create_dir_all(root.join("etc/empty")).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("etc/hostname"), "sandbox\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    fs::write(root.join("usr/bin/big"), &big).unwrap();
    fs::write(root.join("usr/bin/empty"), b"").unwrap();
    fs::set_permissions(root.join("usr/bin/big"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir(root.join("tmp")).unwrap();
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::symlink("../etc/hostname", root.join("usr/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/abs", root.join("dangling")).unwrap();
    fs::hard_link(root.join("etc/hostname"), root.join("usr/hostname-hardlink")).unwrap();
    nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    // A sparse file: 1 MiB data, 64 MiB hole, 4 KiB data, trailing hole.
    let f = fs::File::create(root.join("sparse")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![7u8; 1 << 20], 0).unwrap();
    f.write_all_at(&[9u8; 4096], 65 << 20).unwrap();
    f.set_len(80 << 20).unwrap();
    xattr::set(root.join("etc/hostname"), "user.cairn.test", b"value").unwrap();
    if is_root() {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        mknod(&root.join("null"), SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(1, 3)).unwrap();
        mknod(&root.join("loop9"), SFlag::S_IFBLK, Mode::from_bits_truncate(0o660), makedev(7, 9)).unwrap();
        nix::unistd::chown(&root.join("etc/hostname"), Some(1234.into()), Some(5678.into())).unwrap();
        // security.capability as setcap writes it: cap_net_bind_service=ep (VFS_CAP_REVISION_2).
        let cap = [0u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let _ = xattr::set(root.join("usr/bin/big"), "security.capability", &cap);
    }
}

/// Everything about one entry that a restore must reproduce.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Entry {
    pub kind: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub rdev: u64,
    pub target: Option<PathBuf>,
    pub digest: Option<[u8; 32]>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// The first path (in walk order) of this entry's hard-link group, if linked.
    pub link: Option<String>,
    /// A file with fewer allocated blocks than its size (it has holes): holes must stay holes.
    pub blocks_small: bool,
}

/// Every file (not directory) under `dir`, at any depth.
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Walk `root` and describe every entry by relative path.
pub fn describe(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), String> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes);
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, Entry>,
    inodes: &mut BTreeMap<(u64, u64), String>,
) {
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for p in names {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let ft = m.file_type();
        let link = if !ft.is_dir() && m.nlink() > 1 {
            Some(inodes.entry((m.dev(), m.ino())).or_insert_with(|| rel.clone()).clone())
        } else {
            None
        };
        let mut xattrs = BTreeMap::new();
        if let Ok(names) = xattr::list(&p) {
            for n in names {
                if let Ok(Some(v)) = xattr::get(&p, &n) {
                    xattrs.insert(n.to_string_lossy().into_owned(), v);
                }
            }
        }
        let e = Entry {
            kind: m.mode() & S_IFMT,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: (m.mtime(), m.mtime_nsec()),
            size: if ft.is_dir() { 0 } else { m.size() },
            rdev: m.rdev(),
            target: ft.is_symlink().then(|| std::fs::read_link(&p).unwrap()),
            digest: ft
                .is_file()
                .then(|| *blake3::Hasher::new().update(&std::fs::read(&p).unwrap()).finalize().as_bytes()),
            xattrs,
            link,
            blocks_small: ft.is_file() && m.blocks() * 512 < m.size(),
        };
        out.insert(rel, e);
        if ft.is_dir() {
            walk(root, &p, out, inodes);
        }
    }
}

/// The file-type bits of `st_mode`.
const S_IFMT: u32 = 0o170000;

/// Assert two trees are equal entry by entry, naming the first difference.
pub fn assert_same_tree(a: &Path, b: &Path) {
    assert_same_tree_with(a, b, true)
}

/// As [`assert_same_tree`]; `holes: false` skips the check that sparse files stay sparse
/// (a mount reports allocated blocks from the logical size).
pub fn assert_same_tree_with(a: &Path, b: &Path, holes: bool) {
    let strip = |mut d: BTreeMap<String, Entry>| {
        if !holes {
            d.values_mut().for_each(|e| e.blocks_small = false);
        }
        d
    };
    let (da, db) = (strip(describe(a)), strip(describe(b)));
    let ka: Vec<_> = da.keys().collect();
    let kb: Vec<_> = db.keys().collect();
    assert_eq!(ka, kb, "different entries");
    for (k, ea) in &da {
        assert_eq!(ea, &db[k], "entry {k} differs");
    }
    // The roots themselves: mode and mtime.
    let (ma, mb) = (std::fs::metadata(a).unwrap(), std::fs::metadata(b).unwrap());
    assert_eq!(ma.mode() & 0o7777, mb.mode() & 0o7777, "root mode");
    assert_eq!(ma.mtime(), mb.mtime(), "root mtime");
}

/// Whether `dir` is a mountpoint now (per /proc/self/mountinfo).
pub fn is_mounted(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| l.split(' ').nth(4) == Some(dir.to_str().unwrap_or("")))
}

/// A `cairn mount` daemon running in the foreground of a child process.
pub struct MountProc {
    pub child: Child,
    pub dir: PathBuf,
    pub stats_file: PathBuf,
}

impl Repo {
    /// Start `cairn mount SNAP DIR` and wait until the kernel lists the mount.
    pub fn mount(&self, snapshot: &str, dir: &Path, extra: &[&str]) -> MountProc {
        std::fs::create_dir_all(dir).unwrap();
        let stats_file = dir.with_extension("stats.json");
        let mut args =
            vec!["mount", snapshot, dir.to_str().unwrap(), "--stats-file", stats_file.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut child =
            self.cmd(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("run cairn mount");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_mounted(dir) {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("cairn mount exited ({status}) before mounting:\n{err}");
            }
            assert!(Instant::now() < deadline, "mount of {} did not appear", dir.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        MountProc { child, dir: dir.to_path_buf(), stats_file }
    }
}

impl MountProc {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// The counters the daemon refreshes every second (waits for the first write).
    pub fn stats(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = std::fs::read_to_string(&self.stats_file) {
                if let Ok(v) = serde_json::from_str(&s) {
                    return v;
                }
            }
            assert!(Instant::now() < deadline, "no stats file from the mount");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM the daemon, wait for it, and return its exit status and stderr.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "mount daemon ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        (status, err)
    }
}

impl Drop for MountProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("fusermount3").args(["-u", "-z"]).arg(&self.dir).status();
        }
    }
}

/// A TCP relay to a server that a test can cut off and reconnect, to play an unreachable
/// bucket without losing the server's state.
pub struct Relay {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn start(target_port: u16) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (up2, live2) = (up.clone(), live.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else { continue };
                let mut l = live2.lock().unwrap();
                l.push(client.try_clone().unwrap());
                l.push(server.try_clone().unwrap());
                for (mut from, mut to) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, up, live }
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for s in self.live.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// The workspace root (for scripts the tests run).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The real Debian root filesystem of scripts/testdata.sh (built on first use).
pub fn debian_rootfs() -> PathBuf {
    if let Ok(p) = std::env::var("CAIRN_TEST_ROOTFS") {
        if Path::new(&format!("{p}.done")).exists() {
            return PathBuf::from(p);
        }
    }
    let out = Command::new("bash")
        .arg(workspace_root().join("scripts/testdata.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/testdata.sh");
    assert!(out.status.success(), "scripts/testdata.sh could not build the Debian rootfs (see above)");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}
