//! An S3-compatible server for the tests that need one: s3s-fs over a folder, with SigV4 auth by
//! fixed test credentials. Included with `#[path]` by those tests only, so the others do not link
//! the server.

use std::net::SocketAddr;
use std::path::Path;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnectionBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::task::JoinSet;

pub const ACCESS_KEY: &str = "AKIDESKGENTEST";
pub const SECRET_KEY: &str = "deskgen-test-secret-key";

/// Serves `root` on `addr` (port 0 for any free one); abort the handle to take it down,
/// connections and all.
pub async fn start_s3(root: &Path, addr: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mut builder = S3ServiceBuilder::new(s3s_fs::FileSystem::new(root).unwrap());
    builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        // Owned by this task: aborting the task drops the set, which aborts every connection.
        let mut connections = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let service = service.clone();
            connections.spawn(async move {
                let _ = ConnectionBuilder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, server)
}
