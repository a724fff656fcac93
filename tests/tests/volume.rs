//! Volumes: heads moved by conditional writes, writable mounts used by real programs, and
//! commits whose cost follows what changed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_tests::*;

fn sh(script: &str, cwd: &Path, env: &[(&str, &str)]) {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(cwd)
        .envs(env.iter().copied())
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "script failed in {}:\n{script}\n{}{}",
        cwd.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `cairn mount --rw` running in a child process.
struct RwMount {
    child: Option<Child>,
    dir: PathBuf,
    state: PathBuf,
}

impl RwMount {
    fn start(repo: &Repo, volume: &str, dir: &Path, state: &Path, extra: &[&str]) -> RwMount {
        std::fs::create_dir_all(dir).unwrap();
        let mut args =
            vec!["mount", "--rw", volume, dir.to_str().unwrap(), "--state-dir", state.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut child = repo.cmd(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_mounted(dir) {
            if let Some(status) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                panic!("cairn mount --rw exited ({status}):\n{}", String::from_utf8_lossy(&out.stderr));
            }
            assert!(Instant::now() < deadline, "rw mount did not appear");
            std::thread::sleep(Duration::from_millis(10));
        }
        RwMount { child: Some(child), dir: dir.into(), state: state.into() }
    }

    /// SIGTERM and wait; returns (success, stdout, stderr).
    fn stop(mut self) -> (bool, String, String) {
        let child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for RwMount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let lower = self.state.join("lower");
        if is_mounted(&lower) {
            let _ = Command::new("fusermount3").args(["-u", "-z"]).arg(&lower).status();
        }
    }
}

fn head(repo: &Repo, name: &str) -> serde_json::Value {
    repo.json(&["volume", "show", name])
}

fn version(repo: &Repo, name: &str) -> u64 {
    head(repo, name)["version"].as_u64().unwrap()
}

#[test]
fn volume_commands_history_rollback_and_retention() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let bad = repo.run(&["volume", "create", "../x"]);
    assert_eq!(bad.status.code(), Some(2), "a usage error: {}", String::from_utf8_lossy(&bad.stderr));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("may only hold"));

    let created = repo.json(&["volume", "create", "data"]);
    assert_eq!(created["version"], 1);
    let again = repo.run(&["volume", "create", "data"]);
    assert_eq!(again.status.code(), Some(4), "a second create is a conflict");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/a"), b"one").unwrap();
    let v2 = repo.json(&["push", "--volume", "data", src.to_str().unwrap()]);
    assert_eq!(v2["head"]["version"], 2);
    std::fs::write(src.join("d/a"), b"two").unwrap();
    std::fs::write(src.join("b"), b"new").unwrap();
    let v3 = repo.json(&["push", "--volume", "data", src.to_str().unwrap()]);
    assert_eq!(v3["head"]["version"], 3);
    let (s2, s3) = (v2["summary"]["snapshot"].as_str().unwrap(), v3["summary"]["snapshot"].as_str().unwrap());
    // Lineage: each version's parent is the version before.
    assert_eq!(repo.json(&["show", s3])["snapshot"]["parent"], s2);
    let diff = repo.ok(&["diff", s2, s3]);
    assert!(diff.contains("M /d/a") && diff.contains("+ /b"), "{diff}");
    // A stale expectation is refused before any work.
    let stale = repo.run(&["push", "--volume", "data", "--expect-version", "2", src.to_str().unwrap()]);
    assert_eq!(stale.status.code(), Some(4));
    assert_eq!(version(&repo, "data"), 3);

    // Rollback makes a new version holding version 2's tree.
    let rolled = repo.json(&["volume", "rollback", "data", "2"]);
    assert_eq!(rolled["version"], 4);
    let s4 = rolled["snapshot"].as_str().unwrap().to_string();
    assert_eq!(repo.ok(&["diff", s2, &s4]), "", "rollback holds exactly version 2");
    assert_eq!(repo.ok(&["cat", &format!("{s4}:/d/a")]), "one");
    let history = repo.json(&["volume", "history", "data"]);
    let versions: Vec<u64> =
        history.as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).collect();
    assert_eq!(versions, vec![1, 2, 3, 4]);
    assert_eq!(history[3]["how"], "rollback to 2");
    let list = repo.json(&["volume", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "data");

    // Retention by volume: keep-last 1 keeps the head; a keep-tag-only policy (which keeps
    // no "newest") still cannot remove the head.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let unrelated = repo.push(&other, &[]);
    let report = repo.json(&["forget", "--volume", "data", "--keep-tag", "x=y"]);
    let kept: Vec<&str> = report["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == true)
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(kept, vec![s4.as_str()], "{report}");
    assert_eq!(report["removed"], 3);
    let snaps = repo.json(&["snapshots"]);
    let ids: Vec<&str> = snaps.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&s4.as_str()) && ids.contains(&unrelated.as_str()) && ids.len() == 2, "{ids:?}");
    repo.ok(&["gc"]);
    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    assert_eq!(repo.ok(&["cat", &format!("{s4}:/d/a")]), "one");
    // A forgotten version cannot be rolled back to, and says so.
    let gone = repo.run(&["volume", "rollback", "data", "3"]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("was forgotten"));

    // A head naming a missing snapshot stops gc before it deletes anything.
    repo.ok(&["volume", "create", "broken", "--from", &s4]);
    let broken = head(&repo, "broken")["snapshot"].as_str().unwrap().to_string();
    std::fs::remove_file(tmp.path().join("repo/snapshots").join(&broken)).unwrap();
    std::fs::write(src.join("garbage"), vec![7u8; 100_000]).unwrap();
    let doomed = repo.push(&src, &[]);
    std::fs::remove_file(tmp.path().join("repo/snapshots").join(&doomed)).unwrap();
    let packs_before = repo.json(&["stats"])["data_packs"].clone();
    let refused = repo.run(&["gc"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refusing to collect"));
    assert_eq!(repo.json(&["stats"])["data_packs"], packs_before, "nothing deleted");
    repo.ok(&["volume", "delete", "broken"]);
    let collected = repo.json(&["gc"]);
    assert!(collected["packs_deleted"].as_u64().unwrap() >= 1, "{collected}");

    let deleted = repo.json(&["volume", "delete", "data"]);
    assert_eq!(deleted["version"], 4);
    assert_eq!(repo.json(&["volume", "list"]).as_array().unwrap().len(), 0);
    let missing = repo.run(&["push", "--volume", "data", src.to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("volume data not found"));
}

/// Two processes commit to one volume at once, 100 rounds, against moto's conditional
/// writes: one winner and one clean conflict each round, a linear history, nothing lost.
#[test]
fn concurrent_commits_have_one_winner_per_round() {
    let moto = Moto::start();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::s3(&moto, "volumes");
    repo.ok(&["init"]);
    repo.ok(&["volume", "create", "shared"]);
    let dirs: Vec<PathBuf> = (0..2).map(|i| tmp.path().join(format!("w{i}"))).collect();
    let mut winners = Vec::new();
    let mut raced = 0; // conflicts found by the conditional write itself, not the early check
    const ROUNDS: u64 = 100;
    for round in 0..ROUNDS {
        let expect = (round + 1).to_string();
        let children: Vec<Child> = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                std::fs::create_dir_all(d).unwrap();
                std::fs::write(d.join("who"), format!("round {round} writer {i}")).unwrap();
                repo.cmd(&["push", "--volume", "shared", "--expect-version", &expect, d.to_str().unwrap()])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        let won: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
        assert_eq!(won.len(), 1, "round {round}: {:?}", outs);
        let lost = 1 - won[0];
        assert_eq!(outs[lost].status.code(), Some(4), "round {round}: {:?}", outs[lost]);
        let err = String::from_utf8_lossy(&outs[lost].stderr);
        assert!(err.contains("nothing was committed"), "{err}");
        if err.contains("moved while committing") {
            raced += 1;
        }
        let id = String::from_utf8_lossy(&outs[won[0]].stdout).lines().last().unwrap().to_string();
        winners.push((id, format!("round {round} writer {}", won[0])));
    }
    eprintln!("{raced} of {ROUNDS} conflicts were decided by the conditional head update");
    let history = repo.json(&["volume", "history", "shared"]);
    let history = history.as_array().unwrap();
    assert_eq!(history.len() as u64, ROUNDS + 1);
    for (i, v) in history.iter().enumerate() {
        assert_eq!(v["version"].as_u64().unwrap(), i as u64 + 1);
    }
    // Every winner's content is its version, each version's parent the one before, and no
    // loser's snapshot is left behind.
    let mut parent = history[0]["snapshot"].as_str().unwrap().to_string();
    for (i, (id, content)) in winners.iter().enumerate() {
        assert_eq!(history[i + 1]["snapshot"].as_str().unwrap(), id);
        assert_eq!(&repo.ok(&["cat", &format!("{id}:/who")]), content);
        assert_eq!(repo.json(&["show", id])["snapshot"]["parent"], parent.as_str());
        parent = id.clone();
    }
    assert_eq!(repo.json(&["snapshots"]).as_array().unwrap().len() as u64, ROUNDS + 1);
}

/// Write a minimal wheel (a zip with dist-info) that pip can install offline.
fn make_wheel(dir: &Path) -> PathBuf {
    let wheel = dir.join("cairnprobe-1.0-py3-none-any.whl");
    let script = format!(
        r#"
import base64, hashlib, zipfile
files = {{
    "cairnprobe/__init__.py": "VALUE = 42\n",
    "cairnprobe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: cairnprobe\nVersion: 1.0\n",
    "cairnprobe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}}
record = []
with zipfile.ZipFile("{}", "w") as z:
    for name, text in files.items():
        data = text.encode()
        z.writestr(zipfile.ZipInfo(name, (2026, 1, 1, 0, 0, 0)), data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{{name}},sha256={{digest}},{{len(data)}}")
    record.append("cairnprobe-1.0.dist-info/RECORD,,")
    z.writestr(zipfile.ZipInfo("cairnprobe-1.0.dist-info/RECORD", (2026, 1, 1, 0, 0, 0)), "\n".join(record) + "\n")
"#,
        wheel.display()
    );
    let st = Command::new("python3").args(["-c", &script]).status().unwrap();
    assert!(st.success());
    wheel
}

/// What a sandbox does to a volume; run once on a local directory and once in a mount.
const WORKLOAD: &str = r#"
git init -q -b main repo
cd repo
git config user.email t@example.com && git config user.name t
echo a > a.txt && mkdir d && echo b > d/b.txt
git add -A && git commit -qm one
echo c >> a.txt && git commit -qam two
git fsck --strict 2>/dev/null
cd ..
python3 -m venv venv
venv/bin/pip install -q --no-index --no-cache-dir --disable-pip-version-check "$WHEEL"
test "$(venv/bin/python -c 'import cairnprobe; print(cairnprobe.VALUE)')" = 42
python3 -c '
import sqlite3
db = sqlite3.connect("db.sqlite")
db.execute("create table t (k integer primary key, v text)")
db.executemany("insert into t values (?, ?)", [(i, "v%d" % i) for i in range(5000)])
db.commit()
db.execute("delete from t where k % 3 = 0")
db.commit()
db.close()
'
test "$(sqlite3 db.sqlite 'select count(*) from t')" = 3333
tar -xf "$TARBALL"
rm -rf old
echo one > f1 && echo two > f2 && mv f1 f2
mkdir dirA && echo x > dirA/x && mv dirA dirB
mv keep kept
mv kept/sub kept/moved
ln f2 f2link && ln -s f2 f2sym
chmod 600 f2 && chown 1234:4321 kept/k1
truncate -s 10 kept/trunc && truncate -s 3000000 kept/grow
python3 -c 'import os; os.setxattr("kept/k1", "user.note", b"hello"); os.removexattr("kept/k2", "user.gone")'
touch -d '2020-01-02 03:04:05' kept/k2
rm kept/k3
sync
"#;

fn seed(dir: &Path) {
    std::fs::create_dir_all(dir.join("old/deep/er")).unwrap();
    for i in 0..50 {
        std::fs::write(dir.join(format!("old/deep/er/f{i}")), format!("old {i}")).unwrap();
    }
    std::fs::create_dir_all(dir.join("keep/sub")).unwrap();
    for k in ["k1", "k2", "k3", "trunc", "grow"] {
        std::fs::write(dir.join("keep").join(k), format!("content of {k}").repeat(100)).unwrap();
    }
    std::fs::write(dir.join("keep/sub/s"), b"sub").unwrap();
    xattr::set(dir.join("keep/k2"), "user.gone", b"bye").unwrap();
}

/// Compare a committed tree with a reference made by the same operations on a local
/// directory. Times differ between the two runs, and so do the few files that record them
/// (`.git/index` stat data, `.pyc` source timestamps); everything else must be equal.
fn assert_same_outcome(reference: &Path, committed: &Path) {
    let (a, b) = (describe(reference), describe(committed));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "different entries");
    for (path, ea) in &a {
        let eb = &b[path];
        let timestamped = path.ends_with(".git/index") || path.ends_with(".pyc");
        assert_eq!(
            (ea.kind, ea.mode, ea.uid, ea.gid, ea.size, &ea.target, &ea.xattrs, &ea.link),
            (eb.kind, eb.mode, eb.uid, eb.gid, eb.size, &eb.target, &eb.xattrs, &eb.link),
            "{path}"
        );
        if !timestamped {
            assert_eq!(ea.digest, eb.digest, "{path}: content differs");
        }
    }
}

#[test]
fn writable_mount_runs_real_programs_and_commits_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let wheel = make_wheel(tmp.path());
    let payload = tmp.path().join("payload");
    std::fs::create_dir_all(payload.join("untarred/x/y")).unwrap();
    std::fs::write(payload.join("untarred/x/y/z"), b"zzz").unwrap();
    std::os::unix::fs::symlink("x/y/z", payload.join("untarred/link")).unwrap();
    let tarball = tmp.path().join("payload.tar");
    sh(&format!("tar -cf {} -C {} untarred", tarball.display(), payload.display()), tmp.path(), &[]);
    let env = [
        ("WHEEL", wheel.to_str().unwrap()),
        ("TARBALL", tarball.to_str().unwrap()),
        ("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z"),
        ("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z"),
        ("HOME", tmp.path().to_str().unwrap()),
    ];

    let src = tmp.path().join("seed");
    seed(&src);
    repo.ok(&["volume", "create", "work"]);
    repo.ok(&["push", "--volume", "work", src.to_str().unwrap()]);

    // The reference: the same workload on a local copy, at the same path the mount will use
    // (a venv records its own path).
    let work = tmp.path().join("work");
    sh(&format!("cp -a {}/. {}", src.display(), work.display()), tmp.path(), &[]);
    sh(WORKLOAD, &work, &env);
    let reference = tmp.path().join("reference");
    std::fs::rename(&work, &reference).unwrap();

    let state = tmp.path().join("state");
    let mnt = RwMount::start(&repo, "work", &work, &state, &[]);
    sh(WORKLOAD, &work, &env);
    let committed = repo.json(&["volume", "commit", work.to_str().unwrap()]);
    assert_eq!(committed["head"]["version"], 3, "{committed}");
    let snap = committed["summary"]["snapshot"].as_str().unwrap().to_string();
    // The view at commit time, exactly (times included), for the comparison below.
    let view = tmp.path().join("view");
    sh(&format!("cp -a {}/. {}", work.display(), view.display()), tmp.path(), &[]);
    // The mount goes on, now on version 3: a further change commits as version 4.
    std::fs::write(work.join("after"), b"later").unwrap();
    let (ok, _, err) = mnt.stop();
    assert!(ok, "{err}");
    assert!(!is_mounted(&work));

    let ro = tmp.path().join("ro");
    let m = repo.mount(&snap, &ro, &[]);
    assert_same_tree_with(&view, &ro, false);
    assert_same_outcome(&reference, &ro);
    drop(m);

    // Uncommitted changes survive the unmount; remounting the state directory resumes them
    // and the next commit carries them.
    let mnt = RwMount::start(&repo, "work", &work, &state, &["--commit-on-unmount"]);
    assert_eq!(std::fs::read(work.join("after")).unwrap(), b"later");
    let (ok, stdout, err) = mnt.stop();
    assert!(ok, "{err}");
    let v4 = stdout.lines().last().unwrap().to_string();
    assert_eq!(version(&repo, "work"), 4);
    assert_eq!(repo.ok(&["diff", &snap, &v4]), "+ /after\n");

    // Retention keeps the head and the snapshot the state directory's lower layer shows, so
    // the same state directory mounts and commits again after forget and gc.
    let base = repo.json(&["volume", "history", "work"])[1]["snapshot"].as_str().unwrap().to_string();
    let report = repo.json(&["forget", "--volume", "work", "--keep-last", "1"]);
    let mut kept: Vec<String> = report["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == true)
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    kept.sort();
    let mut want = vec![base, v4.clone()];
    want.sort();
    assert_eq!(kept, want, "{report}");
    repo.ok(&["gc"]);
    let mnt = RwMount::start(&repo, "work", &work, &state, &[]);
    std::fs::remove_file(work.join("after")).unwrap();
    let v5 = repo.json(&["volume", "commit", work.to_str().unwrap()]);
    assert_eq!(v5["head"]["version"], 5);
    assert_eq!(repo.ok(&["diff", &v4, v5["summary"]["snapshot"].as_str().unwrap()]), "- /after\n");
    let (ok, _, err) = mnt.stop();
    assert!(ok, "{err}");
    let check = repo.json(&["check", "--read-data"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
}

#[test]
fn writable_mount_survives_a_crash_and_a_killed_commit_moves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    repo.ok(&["volume", "create", "v"]);
    let (work, state) = (tmp.path().join("work"), tmp.path().join("state"));
    let mnt = RwMount::start(&repo, "v", &work, &state, &[]);
    std::fs::write(work.join("small"), b"written before the crash").unwrap();
    // Incompressible, so the commit below takes long enough to be killed half-way.
    sh("head -c 300000000 /dev/urandom > big && sync", &work, &[]);
    mnt.kill9();
    // The dead daemon left a dead overlay behind; a new mount with the same state resumes.
    let mnt = RwMount::start(&repo, "v", &work, &state, &[]);
    assert_eq!(std::fs::read(work.join("small")).unwrap(), b"written before the crash");

    // A commit is done by the mount daemon: kill the daemon half-way through one.
    let mut commit = repo
        .cmd(&["volume", "commit", work.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let finished_early = commit.try_wait().unwrap().is_some_and(|s| s.success());
    mnt.kill9();
    let _ = commit.wait();
    if !finished_early {
        assert_eq!(version(&repo, "v"), 1, "a commit killed half-way must not move the head");
    }
    let check = repo.json(&["check"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0, "{check}");
    let mnt = RwMount::start(&repo, "v", &work, &state, &[]);
    assert_eq!(std::fs::read(work.join("small")).unwrap(), b"written before the crash");

    let committed = repo.json(&["volume", "commit", work.to_str().unwrap()]);
    let snap = committed["summary"]["snapshot"].as_str().unwrap().to_string();
    let big = std::fs::read(work.join("big")).unwrap();
    let (ok, _, err) = mnt.stop();
    assert!(ok, "{err}");
    let out = tmp.path().join("out");
    repo.ok(&["restore", &snap, out.to_str().unwrap()]);
    assert_eq!(std::fs::read(out.join("small")).unwrap(), b"written before the crash");
    assert!(std::fs::read(out.join("big")).unwrap() == big, "big file differs");
}

/// A one-file change in a 1 GiB volume: the commit reads and uploads about that file, not
/// the volume.
#[test]
fn commit_cost_follows_the_change_not_the_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    const FILES: usize = 64;
    const FILE: u64 = 16 << 20;
    for d in 0..8 {
        sh(
            &format!("mkdir -p d{d} && for i in $(seq 0 7); do head -c {FILE} /dev/urandom > d{d}/f$i; done"),
            &src,
            &[],
        );
    }
    repo.ok(&["volume", "create", "big"]);
    let first = repo.json(&["push", "--volume", "big", src.to_str().unwrap()]);
    assert!(first["summary"]["stats"]["bytes"].as_u64().unwrap() >= FILES as u64 * FILE);
    let (work, state) = (tmp.path().join("work"), tmp.path().join("state"));
    let mnt = RwMount::start(&repo, "big", &work, &state, &[]);
    // Change 1 MiB in the middle of one 16 MiB file.
    sh("dd if=/dev/urandom of=d3/f5 bs=1M seek=8 count=1 conv=notrunc status=none", &work, &[]);
    // Older than a second, so the change cache may trust the file's times from now on.
    std::thread::sleep(Duration::from_millis(1100));
    let c = repo.json(&["volume", "commit", work.to_str().unwrap()]);
    // Committing again without changes reads nothing: the daemon's change cache knows the
    // upper layer's files.
    let again = repo.json(&["volume", "commit", work.to_str().unwrap()]);
    assert_eq!(again["head"]["version"], 4);
    assert_eq!(again["summary"]["stats"]["bytes_read"], 0, "{again}");
    assert_eq!(again["summary"]["stats"]["stored_bytes"], 0, "{again}");
    let (ok, _, err) = mnt.stop();
    assert!(ok, "{err}");
    let stats = &c["summary"]["stats"];
    let req = &c["summary"]["requests"];
    eprintln!("commit: {c}");
    let read = stats["bytes_read"].as_u64().unwrap();
    let up = req["bytes_up"].as_u64().unwrap();
    let down = req["bytes_down"].as_u64().unwrap();
    assert_eq!(stats["files"], 1, "only the changed file is walked");
    assert!(read <= 2 * FILE, "read {read} bytes for a {FILE}-byte file");
    // Content-defined chunks: a 1 MiB change stores a few chunks around it, not the file.
    assert!(up <= 2 * FILE, "uploaded {up} bytes");
    assert!(up >= 1 << 20, "uploaded {up} bytes: the change itself must be stored");
    assert!(down <= 1 << 20, "downloaded {down} bytes for the commit");
    let snap = c["summary"]["snapshot"].as_str().unwrap();
    let diff = repo.ok(&["diff", first["summary"]["snapshot"].as_str().unwrap(), snap]);
    assert_eq!(diff, "M /d3/f5\n");
    let check = repo.json(&["check"]);
    assert_eq!(check["damage"].as_array().unwrap().len(), 0);
}

#[test]
fn busy_unmount_is_refused_and_a_deleted_volumes_state_is_not_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::local(&tmp.path().join("repo"));
    repo.ok(&["init"]);
    repo.ok(&["volume", "create", "v"]);
    let (work, state) = (tmp.path().join("work"), tmp.path().join("state"));
    let mut mnt = RwMount::start(&repo, "v", &work, &state, &["--commit-on-unmount"]);
    std::fs::write(work.join("f"), b"one").unwrap();
    // The volume's root looks like the empty volume's root, not like the state directory.
    assert_eq!(std::fs::metadata(&work).unwrap().permissions().mode() & 0o7777, 0o755);
    {
        let _open = std::fs::File::open(work.join("f")).unwrap();
        let busy = repo.run(&["umount", work.to_str().unwrap()]);
        assert_eq!(busy.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&busy.stderr).contains("busy"), "{busy:?}");
        assert!(is_mounted(&work), "a busy writable mount stays mounted");
    }
    repo.ok(&["umount", work.to_str().unwrap()]);
    let mut child = mnt.child.take().unwrap();
    let out = child.wait().unwrap();
    assert!(out.success());
    assert_eq!(version(&repo, "v"), 2, "committed on unmount");

    // Another volume of the same name is not the one this state directory belongs to.
    repo.ok(&["volume", "delete", "v"]);
    repo.ok(&["volume", "create", "v"]);
    let refused =
        repo.run(&["mount", "--rw", "v", work.to_str().unwrap(), "--state-dir", state.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("earlier volume named v"), "{refused:?}");
    assert!(!is_mounted(&work));
}
