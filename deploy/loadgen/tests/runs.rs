//! The load generator against a real embedded gateway (on port 0): a run whose handshakes are
//! partly refused still ends with a report that counts them, and thresholds set the exit code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::process::Command;

use serde_json::{Value, json};
use shared::config::Config;

const ADMIN: &str = "loadgen-test-admin-token-0123456789abcdef";

struct App {
    url: String,
    _dir: tempfile::TempDir,
}

async fn spawn_gateway() -> App {
    let dir = tempfile::TempDir::new().unwrap();
    let config = Config {
        bind: "127.0.0.1:0".into(),
        metrics_bind: "127.0.0.1:0".into(),
        database_url: format!("sqlite://{}", dir.path().join("lg.db").display()),
        admin_token: Some(ADMIN.into()),
        bootstrap_tenant: false,
        ..Config::default()
    };
    let app = gateway::Application::build(config).await.unwrap();
    let url = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until_stopped());
    App { url, _dir: dir }
}

async fn tenant(app: &App, settings: Value) -> String {
    let res = reqwest::Client::new()
        .post(format!("{}/admin/v1/tenants", app.url))
        .bearer_auth(ADMIN)
        .json(&json!({"name": format!("t-{}", uuid_ish()), "settings": settings}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    res.json::<Value>().await.unwrap()["api_key"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn uuid_ish() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Runs the loadgen binary to its end; returns its exit code and its report.
async fn loadgen(args: &[&str]) -> (i32, Value) {
    let dir = tempfile::TempDir::new().unwrap();
    let report = dir.path().join("report.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.args(args).arg("--report").arg(&report);
    let status = tokio::task::spawn_blocking(move || cmd.status().unwrap())
        .await
        .unwrap();
    let text = std::fs::read_to_string(&report).unwrap_or_else(|_| "null".into());
    (
        status.code().unwrap_or(-1),
        serde_json::from_str(&text).unwrap(),
    )
}

/// Runs the loadgen against `app` with the admin token (a tenant of its own), then `args`.
async fn loadgen_against(app: &App, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--url", app.url.as_str(), "--admin-token", ADMIN];
    all.extend_from_slice(args);
    loadgen(&all).await
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_handshakes_are_counted_and_the_run_still_reports() {
    let app = spawn_gateway().await;
    // Five connection slots for ten sockets (each its chat's sender): five are refused with
    // CONNECTION_LIMIT, the other five are answered.
    let key = tenant(
        &app,
        json!({"max_connections": 5, "messages_per_second": 1000}),
    )
    .await;
    let (code, report) = loadgen(&[
        "--url",
        &app.url,
        "--api-key",
        &key,
        "--sockets",
        "10",
        "--chats",
        "10",
        "--messages",
        "2",
        "--timeout",
        "60",
    ])
    .await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["refused_by_code"]["CONNECTION_LIMIT"], 5, "{report}");
    assert_eq!(report["sockets"], 5);
    assert_eq!(report["partial"], false);
    assert_eq!(report["answers"], 10, "{report}");
    assert_eq!(report["protocol_violations"], 0);
    for latency in ["connect_ms", "ack_ms", "ttft_ms", "itl_ms", "e2e_ms"] {
        for stat in ["avg", "min", "p50", "p90", "p95", "p99", "p99_9", "max"] {
            assert!(
                report[latency][stat].is_number(),
                "{latency}.{stat}: {report}"
            );
        }
    }
    assert!(report["generator_cpu_s"].is_number());
    assert_eq!(report["targets"], json!([app.url]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_threshold_sets_the_exit_code_and_the_tenant_goes_away() {
    let app = spawn_gateway().await;
    let base = [
        "--url",
        &app.url,
        "--admin-token",
        ADMIN,
        "--sockets",
        "4",
        "--chats",
        "2",
        "--messages",
        "2",
        "--reply-tokens",
        "5",
    ];
    let (code, report) = loadgen(
        &[
            &base[..],
            &["--threshold", "errors==0", "--threshold", "ttft_p99<60s"],
        ]
        .concat(),
    )
    .await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        report["thresholds"].as_array().unwrap().len(),
        2,
        "both kept"
    );
    assert!(
        report["thresholds"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["passed"] == true)
    );
    let (code, report) = loadgen(&[&base[..], &["--threshold", "ttft_p99<1us"]].concat()).await;
    assert_eq!(code, 99, "{report}");
    assert_eq!(report["thresholds"][0]["passed"], false);
    // Both runs deleted the tenant they created.
    let tenants: Value = reqwest::Client::new()
        .get(format!("{}/admin/v1/tenants", app.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tenants["total"], 0, "{tenants}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_cut_by_its_deadline_writes_a_partial_report() {
    let app = spawn_gateway().await;
    let started = std::time::Instant::now();
    let (code, report) = loadgen_against(
        &app,
        &[
            "--sockets",
            "2",
            "--chats",
            "1",
            "--messages",
            "3",
            "--reply-tokens",
            "200",
            "--token-delay-ms",
            "50",
            "--timeout",
            "2",
        ],
    )
    .await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["partial"], true, "{report}");
    assert!(
        report["partial_reason"]
            .as_str()
            .unwrap()
            .contains("deadline")
    );
    assert!(
        report["tokens_delivered"].as_u64().unwrap() > 0,
        "what the sockets saw is kept"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread")]
async fn out_writes_the_report_the_time_series_and_a_page_of_plots() {
    let app = spawn_gateway().await;
    let out = tempfile::TempDir::new().unwrap();
    let pattern = out.path().join("run-{time}");
    let (code, _) = loadgen_against(
        &app,
        &[
            "--sockets",
            "6",
            "--chats",
            "3",
            "--messages",
            "4",
            "--reply-tokens",
            "30",
            "--token-delay-ms",
            "40",
            "--out",
            pattern.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0);
    // `{time}` became the run's start: one folder per run.
    let made: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(made.len(), 1, "{made:?}");
    let name = made[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert!(name.starts_with("run-20") && name.ends_with('Z'), "{name}");
    let dir = made[0].clone();
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["answers"], 6 * 4);
    assert!(report["itl_ms"]["p99"].is_number() && report["e2e_ms"]["max"].is_number());
    let csv = std::fs::read_to_string(dir.join("timeseries.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "t_s,open_sockets,messages_per_s,tokens_per_s,answers_per_s,errors,ttft_p50_ms,ttft_p99_ms"
        )
    );
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|f| f.parse().unwrap()).collect())
        .collect();
    assert!(
        !rows.is_empty(),
        "one row per second of a run of several seconds"
    );
    assert!(rows.iter().all(|r| r.len() == 8));
    assert!(
        rows.iter().any(|r| r[1] == 6.0 && r[3] > 0.0),
        "open sockets and tokens/s: {csv}"
    );
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(
        html.matches("<svg").count() >= 9,
        "five plots over time and four histograms"
    );
    for title in [
        "Throughput",
        "Time to first token",
        "Open sockets",
        "Errors",
        "Inter-token latency",
    ] {
        assert!(html.contains(title), "{title}");
    }
    assert!(
        !html.contains("<script") && !html.contains("src=\"http") && !html.contains("href=\"http"),
        "self-contained"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scenario_file_ramps_and_spikes_for_as_long_as_its_stages_last() {
    let app = spawn_gateway().await;
    let dir = tempfile::TempDir::new().unwrap();
    let file = dir.path().join("spike.toml");
    std::fs::write(
        &file,
        format!(
            "url = \"{}\"\nadmin_token = \"{ADMIN}\"\nsockets = 8\nchats = 4\nreply_tokens = 10\n\
             stage = [\"1s:20\", \"500ms:80\", \"1s:0\"]\nthreshold = [\"protocol_violations==0\"]\n",
            app.url
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let (code, report) = loadgen(&[
        "--scenario",
        file.to_str().unwrap(),
        "--sockets",
        "12",
        "--chats",
        "6",
    ])
    .await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["sockets"], 12, "the command line wins over the file");
    assert_eq!(report["partial"], false, "{report}");
    assert!(
        report["mode"]
            .as_str()
            .unwrap()
            .starts_with("open loop, stages")
    );
    assert!(report["answers"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        report["thresholds"][0]["threshold"],
        "protocol_violations==0"
    );
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(2_500)
            && took < std::time::Duration::from_secs(30),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_over_several_processes_makes_one_merged_report() {
    let app = spawn_gateway().await;
    let out = tempfile::TempDir::new().unwrap();
    // 3 processes, 12 sockets over 4 chats, open loop at 8 msg/s in total (a run of 2.5 s).
    let (code, report) = loadgen_against(
        &app,
        &[
            "--processes",
            "3",
            "--sockets",
            "12",
            "--chats",
            "4",
            "--messages",
            "5",
            "--rate",
            "8",
            "--reply-tokens",
            "10",
            "--threshold",
            "protocol_violations==0",
            "--out",
            out.path().to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["processes"], 3);
    assert_eq!(report["sockets"], 12);
    assert_eq!(report["partial"], false, "{report}");
    // Every socket sees every answer of its chat: 12 sockets × 5 answers.
    assert_eq!(report["answers"], 60, "{report}");
    assert_eq!(report["tokens_delivered"], 600, "{report}");
    // One histogram of all the shards: each chat's sender timed its 5 answers.
    assert_eq!(report["e2e_ms"]["count"], 20, "{report}");
    assert_eq!(report["connect_ms"]["count"], 12, "{report}");
    assert_eq!(report["dropped_sends"], 0, "{report}");
    assert!(report["generator_cpu_s"].as_f64().unwrap() > 0.0);
    let csv = std::fs::read_to_string(out.path().join("timeseries.csv")).unwrap();
    assert!(
        csv.lines()
            .skip(1)
            .any(|l| l.split(',').nth(1) == Some("12")),
        "the merged time series counts every process's sockets: {csv}"
    );
    // The tenant (made once, by the parent) is gone, with its chats.
    let res = reqwest::Client::new()
        .get(format!("{}/admin/v1/tenants", app.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let tenants: Value = res.json().await.unwrap();
    assert_eq!(
        tenants["tenants"].as_array().map(Vec::len),
        Some(0),
        "{tenants}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_storm_mid_answer_resumes_every_socket_without_a_gap() {
    storms_resume_every_socket("1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn storms_over_several_processes_fire_on_one_clock_and_lose_nothing() {
    // The shards start together once all have their sockets open, so each storm finds every
    // chat mid-answer in every process.
    storms_resume_every_socket("3").await;
}

async fn storms_resume_every_socket(processes: &str) {
    let app = spawn_gateway().await;
    // Answers of 30 tokens 40 ms apart (1.2 s each), four per chat: the storm at 1.5 s finds
    // every chat mid-answer, and a second one at 3 s another.
    let (code, report) = loadgen_against(
        &app,
        &[
            "--processes",
            processes,
            "--sockets",
            "6",
            "--chats",
            "3",
            "--messages",
            "4",
            "--reply-tokens",
            "30",
            "--token-delay-ms",
            "40",
            "--storm-at",
            "1500ms",
            "--storm-at",
            "3s",
            "--threshold",
            "storm_reconnect_p99<5s",
        ],
    )
    .await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["storm_reconnects"], 12, "{report}");
    assert_eq!(report["storm_reconnect_ms"]["count"], 12, "{report}");
    assert!(report["storm_reconnect_rate_per_s"].as_f64().unwrap() > 0.0);
    // Each socket resumed with last_seq: every answer whole, no gap, no duplicate.
    assert_eq!(report["answers"], 6 * 4, "{report}");
    assert_eq!(report["tokens_delivered"], 6 * 4 * 30, "{report}");
    assert_eq!(report["protocol_violations"], 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["refused"], 0, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sockets_open_on_their_schedule_at_the_connect_rate() {
    let app = spawn_gateway().await;
    // 20 sockets at 40/s over 2 processes, 20/s each: each process's last is due 0.45 s in
    // (9 / 20 s), so the opening takes at least that long however fast the gateway is.
    let (code, report) = loadgen_against(
        &app,
        &[
            "--processes",
            "2",
            "--sockets",
            "20",
            "--chats",
            "4",
            "--messages",
            "1",
            "--reply-tokens",
            "3",
            "--connect-rate",
            "40",
        ],
    )
    .await;
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["connect_ms"]["count"], 20, "{report}");
    let rate = report["connect_rate_per_s"].as_f64().unwrap();
    assert!(rate > 0.0 && rate <= 45.0, "{report}");
    assert!(
        report["parameters"]
            .as_str()
            .unwrap()
            .contains("connect_rate: 40.0"),
        "{report}"
    );
}

/// `loadgen flood`: every made-up upgrade is counted by how it was refused (the first few per
/// address `AUTH_ERROR`, then `RATE_LIMITED` once the address is throttled, both read from the
/// raw answer), and the real client beside the flood got every handshake through.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_is_counted_by_refusal_and_the_real_client_gets_through() {
    let app = spawn_gateway().await;
    let args = [
        "flood",
        "--url",
        &app.url,
        "--admin-token",
        ADMIN,
        "--rate",
        "300",
        "--duration",
        "2",
        "--source-ips",
        "127.0.2.1,127.0.2.2",
    ];
    let (code, report) = loadgen(&args).await;
    assert_eq!(code, 0, "{report}");
    let flood = &report["flood"];
    let outcomes = flood["outcomes"].as_object().unwrap();
    let counted: u64 = outcomes.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(counted, flood["sent"].as_u64().unwrap(), "{report}");
    assert!(counted >= 400, "{report}");
    // The default allowance is 20 failures per address before it is throttled.
    let auth_errors = outcomes
        .get("AUTH_ERROR")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert!((40..=60).contains(&auth_errors), "{report}");
    assert_eq!(
        counted - auth_errors,
        outcomes["RATE_LIMITED"].as_u64().unwrap(),
        "{report}"
    );
    let real = &report["real_handshake_ms"];
    assert_eq!(real["failed"], 0, "{report}");
    assert!(real["count"].as_u64().unwrap() > 10, "{report}");
}
