//! The run page in a real browser: a run of five processes (a coordinator
//! and a 2 × 2 pipeline of workers), then headless Chromium on the
//! coordinator's `/`. The page must draw the running step and one cell per
//! shard, and write nothing to the browser's console (no exception, no
//! `console.error`: the page logs nothing when it works).
//!
//! Without Chromium the test is skipped, saying so, unless `CI` is set or
//! `PIPEWRIGHT_REQUIRE_ALL=1`: then it fails. `PIPEWRIGHT_CHROMIUM` names
//! the browser binary when it is not `chromium` on the `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pipewright::coord::{Client, Status};

mod common;

use common::procs::{serial, start_run, write_inputs};

/// The browser to drive, if there is one.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PIPEWRIGHT_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| ["chromium", "chromium-browser"].map(|n| d.join(n)))
        .find(|p| p.is_file())
}

/// Whether a missing browser fails the test instead of skipping it.
fn required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
        || std::env::var("PIPEWRIGHT_REQUIRE_ALL").as_deref() == Ok("1")
}

/// Polls the coordinator until `f` holds, for at most `limit`.
fn wait_until(client: &Client, limit: Duration, what: &str, f: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(s) = client.status() {
            if f(&s) {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {limit:?}: {:?}",
            client.status().map(|s| (s.phase, s.step, s.reason))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the browser printed: the page's DOM after its script ran, and its
/// log (standard error).
struct Visit {
    dom: String,
    log: String,
}

/// Loads `url` in headless Chromium, lets the page run for `budget_ms`
/// of virtual time (its first polls), and dumps the DOM. Killed after
/// `limit`.
fn visit(browser: &Path, url: &str, dir: &Path, budget_ms: u64, limit: Duration) -> Visit {
    let (out, err) = (dir.join("dom.html"), dir.join("browser.log"));
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            &format!("--virtual-time-budget={budget_ms}"),
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("dom file"))
        .stderr(std::fs::File::create(&err).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", browser.display()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the browser") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the browser did not finish within {limit:?}; its log:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let visit = Visit {
        dom: std::fs::read_to_string(&out).unwrap_or_default(),
        log: std::fs::read_to_string(&err).unwrap_or_default(),
    };
    assert!(
        status.success(),
        "the browser exited with {status}; its log:\n{}",
        visit.log
    );
    visit
}

/// The text of the element whose `id` is `id` (no nested markup).
fn text_of<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let open = format!("id=\"{id}\"");
    let at = dom.find(&open)?;
    let start = at + dom[at..].find('>')? + 1;
    let end = start + dom[start..].find('<')?;
    Some(&dom[start..end])
}

#[test]
fn the_run_page_shows_the_running_step_and_every_shard_in_a_real_browser() {
    let Some(browser) = chromium() else {
        assert!(
            !required(),
            "Chromium is needed for the run-page test (CI or PIPEWRIGHT_REQUIRE_ALL=1): \
             install it with scripts/system-deps.sh or name it in PIPEWRIGHT_CHROMIUM"
        );
        eprintln!(
            "SKIPPED the_run_page_shows_the_running_step_and_every_shard_in_a_real_browser: \
             no chromium on the PATH (scripts/system-deps.sh installs it)"
        );
        return;
    };
    let started = Instant::now();
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    // Steps enough that the run is still training when the page is read.
    let m = write_inputs(dir.path(), "page", 2, 2, 100_000);
    let (_, url, client, _procs) = start_run(&m, &dir.path().join("run"));
    let before = wait_until(&client, Duration::from_secs(35), "three steps", |s| {
        s.step >= 3
    });

    let v = visit(
        &browser,
        &format!("{url}/"),
        dir.path(),
        3000,
        Duration::from_secs(20),
    );
    let after = client.status().expect("status");

    // Nothing on the console: no uncaught exception, no console.error.
    let console: Vec<&str> = v.log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(
        console.is_empty(),
        "the page wrote to the console:\n{}",
        console.join("\n")
    );
    assert_eq!(
        text_of(&v.dom, "banner"),
        Some(""),
        "the page shows a problem:\n{}",
        v.dom
    );
    // The running step, as the coordinator had it while the page was open.
    let shown: u64 = text_of(&v.dom, "step")
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no step in the page:\n{}", v.dom));
    assert!(
        shown >= before.step && shown <= after.step && shown > 0,
        "the page shows step {shown}; the run was at {} then {}",
        before.step,
        after.step
    );
    assert_eq!(text_of(&v.dom, "run"), Some("page"));
    // One cell per shard, each naming its worker.
    for x in &after.shards {
        let cell = format!("data-shard=\"{}-{}\"", x.stage, x.replica);
        assert_eq!(v.dom.matches(&cell).count(), 1, "{cell} in:\n{}", v.dom);
    }
    assert_eq!(v.dom.matches("data-shard=").count(), after.shards.len());
    for x in &after.shards {
        let fp = x.identity.as_deref().expect("every shard has its identity");
        assert!(v.dom.contains(fp), "identity {fp} is not on the page");
    }
    // The curves and the events were drawn from /v1/history.
    assert!(v.dom.contains("<path"), "no curve drawn:\n{}", v.dom);
    assert!(
        v.dom.contains("registered for stage"),
        "no events:\n{}",
        v.dom
    );
    eprintln!(
        "run page checked in {:.1} s (step {shown})",
        started.elapsed().as_secs_f64()
    );
}
