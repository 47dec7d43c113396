//! `umw-load`: an open-loop HTTP load generator for latency at a fixed request rate (what `wrk` cannot do).
//!
//! ```text
//! umw-load --url http://127.0.0.1:8080/x --rate 1000 --duration 10s [--connections 16] [--body '{"a":1}']
//! ```
//!
//! With `--body`, each request is a `POST` of that JSON body; otherwise a `GET`.
//!
//! Requests are scheduled at fixed intervals and each latency is measured from its scheduled time, so a
//! stall is counted against every request it delays (no coordinated omission). Prints one JSON line:
//! sent, errors, and latency percentiles in microseconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn duration(text: &str) -> anyhow::Result<Duration> {
    let seconds: f64 = text.trim_end_matches('s').parse().context("duration in seconds, e.g. 10s")?;
    Ok(Duration::from_secs_f64(seconds))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url: hyper::Uri = arg(&args, "--url").context("--url is required")?.parse()?;
    let rate: f64 = arg(&args, "--rate").unwrap_or_else(|| "1000".into()).parse()?;
    let length = duration(&arg(&args, "--duration").unwrap_or_else(|| "10s".into()))?;
    let connections: usize = arg(&args, "--connections").unwrap_or_else(|| "16".into()).parse()?;
    let body: Option<bytes::Bytes> = arg(&args, "--body").map(bytes::Bytes::from);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let limit = Arc::new(tokio::sync::Semaphore::new(connections * 4));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let total = (rate * length.as_secs_f64()) as u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<Duration>>();
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let client = client.clone();
        let url = url.clone();
        let tx = tx.clone();
        let permit = limit.clone().acquire_owned().await?;
        let request = match &body {
            Some(body) => hyper::Request::post(url)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(body.clone()))?,
            None => hyper::Request::get(url).body(http_body_util::Full::new(bytes::Bytes::new()))?,
        };
        tokio::spawn(async move {
            let ok = match client.request(request).await {
                Ok(response) => {
                    use http_body_util::BodyExt as _;
                    let good = response.status().is_success();
                    good && response.into_body().collect().await.is_ok()
                }
                Err(_) => false,
            };
            let _ = tx.send(ok.then(|| scheduled.elapsed()));
            drop(permit);
        });
    }
    drop(tx);
    let mut latencies = Vec::with_capacity(total as usize);
    let mut errors = 0u64;
    while let Some(result) = rx.recv().await {
        match result {
            Some(latency) => latencies.push(latency.as_micros() as u64),
            None => errors += 1,
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0);
    println!(
        "{{\"sent\":{total},\"errors\":{errors},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        latencies.last().copied().unwrap_or(0)
    );
    Ok(())
}
