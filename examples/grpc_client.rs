//! A minimal gRPC client: submit a desk photo, follow the task's progress, print the offers.
//!
//!     cargo run --example grpc_client -- http://127.0.0.1:8080 https://example.com/desk.jpg
//!
//! Reads the API key from `DESKGEN_API_KEY` (leave it unset for a server without keys).

use deskgen::api::grpc::pb::generate_client::GenerateClient;
use deskgen::api::grpc::pb::result_client::ResultClient;
use deskgen::api::grpc::pb::{GenerateRequest, GetResultRequest, TaskStatus};
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let server = args.next().unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let photo = args.next();
    let key = std::env::var("DESKGEN_API_KEY").ok();

    let channel = Endpoint::from_shared(server)?.connect().await?;
    let bearer: Option<MetadataValue<_>> = key.map(|k| format!("Bearer {k}").parse()).transpose()?;
    let auth = move |mut request: tonic::Request<()>| {
        if let Some(bearer) = &bearer {
            request.metadata_mut().insert("authorization", bearer.clone());
        }
        Ok(request)
    };
    let mut generate = GenerateClient::with_interceptor(channel.clone(), auth.clone());
    let mut results = ResultClient::with_interceptor(channel, auth);

    let request = GenerateRequest {
        initial_image_url: photo,
        prompt: Some("a minimal wooden desk with warm light".into()),
        ..Default::default()
    };
    let task_id = generate.generate(request).await?.into_inner().task_id;
    println!("task {task_id}");

    let mut updates = results.watch_result(GetResultRequest { task_id, previews: false }).await?.into_inner();
    while let Some(update) = updates.message().await? {
        if let Some(progress) = &update.progress {
            println!("{} {}/{}", progress.stage, progress.step, progress.steps);
        }
        match update.status() {
            TaskStatus::Done => {
                match &update.processed_image_url {
                    Some(url) => println!("image: {url}"),
                    None => println!("no image: {}", update.warnings.join(" ")),
                }
                for recommendation in &update.recommendations {
                    for item in &recommendation.items {
                        println!(
                            "{}: {} {} ({})",
                            recommendation.display_name, item.title, item.price, item.link
                        );
                    }
                }
            }
            TaskStatus::Failed => println!("failed: {} {}", update.error_code(), update.message()),
            _ => {}
        }
    }
    Ok(())
}
