//! The machine's ceiling: the same routes and gRPC methods as deskgen on one listener, axum and
//! tonic with nothing behind them. The benchmark runs it as a child process of its own binary
//! (with [`ADDR_VAR`] set), so it is measured exactly like the real server.

use std::pin::Pin;

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, post};
use deskgen::api::grpc::pb;
use deskgen::api::grpc::pb::generate_server::{Generate, GenerateServer};
use deskgen::api::grpc::pb::result_server::{Result as ResultService, ResultServer};
use futures::Stream;
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

/// Set to an address to make the benchmark binary serve the ceiling there.
pub const ADDR_VAR: &str = "DESKGEN_BENCH_CEILING_ADDR";

#[derive(Clone)]
struct Minimal;

#[tonic::async_trait]
impl Generate for Minimal {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let _ = request.into_inner();
        Ok(Response::new(pb::GenerateResponse {
            task_id: uuid::Uuid::new_v4().to_string(),
            status: pb::TaskStatus::Queued as i32,
        }))
    }

    async fn cancel(&self, _: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
}

type Updates = Pin<Box<dyn Stream<Item = Result<pb::TaskResult, Status>> + Send>>;

#[tonic::async_trait]
impl ResultService for Minimal {
    async fn get_result(
        &self,
        request: Request<pb::GetResultRequest>,
    ) -> Result<Response<pb::TaskResult>, Status> {
        Ok(Response::new(pb::TaskResult {
            task_id: request.into_inner().task_id,
            status: pb::TaskStatus::Queued as i32,
            ..Default::default()
        }))
    }

    type WatchResultStream = Updates;

    async fn watch_result(&self, _: Request<pb::GetResultRequest>) -> Result<Response<Updates>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
}

async fn submit(Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    drop(body);
    (StatusCode::ACCEPTED, Json(json!({"task_id": uuid::Uuid::new_v4().to_string(), "status": "queued"})))
}

async fn result(Path(task_id): Path<String>) -> Json<Value> {
    Json(json!({"task_id": task_id, "status": "queued"}))
}

/// Serves until killed.
pub fn serve(addr: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let rest = axum::Router::new()
            .route("/v1/generate", post(submit))
            .route("/v1/result/{task_id}", get(result));
        let app = tonic::service::Routes::new(GenerateServer::new(Minimal))
            .add_service(ResultServer::new(Minimal))
            .into_axum_router()
            .merge(rest);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}
