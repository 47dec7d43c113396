//! Builds a configuration's event routes: ingest routes for the chain, and the consumers to run. Producers
//! are shared by equal settings and kept across reloads; a consumer whose route, group and connection did
//! not change keeps running through a reload (no rebalance for an unrelated edit).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt as _;
use umw_crds::middleware::{KafkaAcks, KafkaCompression, KafkaConnection, RouteMatch};
use umw_crds::validate::duration_or;

use super::bus::{InProcessBus, Publisher};
use super::kafka::{self, ConsumerSettings, KafkaSettings, Producer};
use super::{DeadLetter, Destination, EventRouteRuntime, Ingest, KafkaSourceHandler, format_of};
use crate::kernel::config::Loaded;
use crate::kernel::health::Health;
use crate::kernel::metrics::Metrics;
use crate::kernel::net::Clients;
use crate::kernel::routing::Matcher;
use crate::kernel::task::version_of;

/// Producers by settings, kept across reloads.
pub type Producers = HashMap<KafkaSettings, Arc<Producer>>;

/// A consumer the configuration asks for; `version` changes whenever anything it depends on does.
#[derive(Clone)]
pub struct ConsumerPlan {
    pub version: u64,
    /// The event route.
    pub route: String,
    pub source: PlanSource,
    pub handler: Arc<dyn kafka::Handler>,
    /// For [`PlanSource::Bus`].
    pub bus: Option<Arc<InProcessBus>>,
}

/// What a consumer reads.
#[derive(Clone)]
pub enum PlanSource {
    Kafka(Box<ConsumerSettings>),
    /// A topic of the in-process bus.
    Bus(String),
}

/// What the event routes of a configuration add.
#[derive(Default)]
pub struct Built {
    /// `(event route name, ingest path, ingest)`.
    pub ingests: Vec<(String, String, Arc<Ingest>)>,
    pub consumers: Vec<ConsumerPlan>,
    /// The Middleware's Kafka connection, resolved (for other consumers, e.g. cache invalidation).
    pub kafka: Option<KafkaSettings>,
}

/// The connection settings of the Middleware's Kafka, with its Secrets resolved.
pub fn kafka_settings(kafka: &KafkaConnection, loaded: &Loaded) -> Result<KafkaSettings, String> {
    use umw_crds::config::resolve;
    let field = |name: &str, e: String| format!("spec.connections.kafka.{name}: {e}");
    let bootstrap_servers = resolve(&kafka.bootstrap_servers).map_err(|e| field("bootstrapServers", e))?;
    let sasl = match &kafka.sasl {
        Some(sasl) => {
            let user = resolve(&sasl.username).map_err(|e| field("sasl.username", e))?;
            let password = resolve(&sasl.password).map_err(|e| field("sasl.password", e))?;
            let mechanism = serde_json::to_value(sasl.mechanism)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "PLAIN".into());
            Some((mechanism, user, crate::kernel::secret::Secret::from(password)))
        }
        None => None,
    };
    let ca_cert = kafka.ca_cert.as_ref().map(resolve).transpose().map_err(|e| field("caCert", e))?;
    let producer = &kafka.producer;
    let pod = std::env::var("UMW_POD_NAME").unwrap_or_default();
    Ok(KafkaSettings {
        bootstrap_servers,
        sasl,
        tls: kafka.tls,
        ca_cert,
        acks: match producer.acks {
            KafkaAcks::All => "all",
            KafkaAcks::Leader => "1",
            KafkaAcks::None => "0",
        },
        linger: duration_or(producer.linger.as_ref(), kafka::DEFAULT_LINGER),
        batch_bytes: producer.batch_bytes,
        compression: match producer.compression {
            KafkaCompression::None => "none",
            KafkaCompression::Gzip => "gzip",
            KafkaCompression::Snappy => "snappy",
            KafkaCompression::Lz4 => "lz4",
        },
        max_in_flight: producer.max_in_flight.map_or(kafka::DEFAULT_MAX_IN_FLIGHT, |n| n as usize),
        delivery_timeout: duration_or(producer.delivery_timeout.as_ref(), kafka::DEFAULT_DELIVERY_TIMEOUT),
        client_id: if pod.is_empty() {
            format!("umw-{}", loaded.middleware().replace('/', "-"))
        } else {
            format!("umw-{}-{pod}", loaded.namespace())
        },
    })
}

/// Compiles every EventRoute of the configuration. `producers` holds the running producers and receives
/// those this configuration uses; with `in_process`, topics are the in-process `bus`'s. Routes that need
/// what this data plane does not do yet (WebSocket destinations, outbox sources) are left out: their
/// policy status says so.
#[allow(clippy::too_many_arguments)]
pub fn build(
    loaded: &Loaded,
    producers: &mut Producers,
    bus: &Arc<InProcessBus>,
    clients: &Clients,
    health: &Health,
    metrics: &Metrics,
    traces: &Option<Arc<crate::kernel::telemetry::Traces>>,
    in_process: bool,
) -> Result<Built, Vec<String>> {
    let bundle = &loaded.bundle;
    let mut built = Built::default();
    let mut problems = Vec::new();
    let kafka = bundle.middleware.spec.connections.kafka.as_ref();
    let settings = match kafka.filter(|_| !in_process).map(|k| kafka_settings(k, loaded)) {
        Some(Ok(settings)) => Some(settings),
        Some(Err(e)) => {
            problems.push(format!("{}: {e}", loaded.origin(&format!("Middleware/{}", bundle.middleware.name_any()))));
            None
        }
        None => None,
    };
    let mut used = Producers::new();
    let mut producer = |problems: &mut Vec<String>| -> Option<Arc<dyn Publisher>> {
        if in_process {
            return Some(bus.clone());
        }
        let settings = settings.as_ref()?;
        if let Some(existing) = used.get(settings).or_else(|| producers.get(settings)).cloned() {
            used.insert(settings.clone(), existing.clone());
            return Some(existing);
        }
        match Producer::new(settings, health, metrics.clone()) {
            Ok(producer) => {
                let producer = Arc::new(producer);
                used.insert(settings.clone(), producer.clone());
                Some(producer as Arc<dyn Publisher>)
            }
            Err(e) => {
                problems.push(e);
                None
            }
        }
    };
    for route in &bundle.event_routes {
        let at = loaded.origin(&format!("EventRoute/{}", route.name_any()));
        let spec = &route.spec;
        if spec.destination.websocket.is_some() || spec.source.outbox.is_some() {
            continue;
        }
        let destination = if let Some(topic) = &spec.destination.kafka {
            let Some(producer) = producer(&mut problems) else { continue };
            let key = match topic.key_template.as_deref().map(umw_crds::template::parse).transpose() {
                Ok(key) => key,
                Err(e) => {
                    problems.push(format!("{at}: spec.destination.kafka.keyTemplate: {e}"));
                    continue;
                }
            };
            Destination::Kafka { producer, topic: topic.topic.clone(), key, format: format_of(spec.format) }
        } else if let Some(webhook) = &spec.destination.http {
            // The URL as the validation reads it (scheme, host, a port in range), then as the client sends to it.
            let url: http::Uri = match umw_crds::validate::HttpUrl::parse(&webhook.url)
                .and_then(|_| webhook.url.parse().map_err(|e: http::uri::InvalidUri| e.to_string()))
            {
                Ok(url) => url,
                Err(e) => {
                    problems.push(format!("{at}: spec.destination.http.url: {e}"));
                    continue;
                }
            };
            let mut headers = Vec::new();
            for (name, value) in &webhook.headers {
                match (http::HeaderName::try_from(name.as_str()), http::HeaderValue::try_from(value.as_str())) {
                    (Ok(name), Ok(value)) => headers.push((name, value)),
                    _ => problems.push(format!("{at}: spec.destination.http.headers: {name:?} is not a valid header")),
                }
            }
            // Values from Secrets: never in a message, and marked sensitive (HPACK does not index them).
            for (name, reference) in &webhook.headers_from {
                let source = umw_crds::ValueSource { value: None, secret_key_ref: Some(reference.clone()) };
                let value = umw_crds::config::resolve(&source).and_then(|v| {
                    http::HeaderValue::try_from(v)
                        .map_err(|_| "the Secret's value is not a valid header value".to_string())
                });
                match (http::HeaderName::try_from(name.as_str()), value) {
                    (Ok(name), Ok(mut value)) => {
                        value.set_sensitive(true);
                        headers.push((name, value));
                    }
                    (Err(_), _) => {
                        problems.push(format!("{at}: spec.destination.http.headersFrom: {name:?} is not a header name"))
                    }
                    (_, Err(e)) => problems.push(format!("{at}: spec.destination.http.headersFrom.{name}: {e}")),
                }
            }
            Destination::Webhook {
                url,
                timeout: duration_or(webhook.timeout.as_ref(), super::DEFAULT_WEBHOOK_TIMEOUT),
                headers,
                clients: Box::new(clients.clone()),
            }
        } else {
            continue;
        };
        let dead_letter = match &spec.dead_letter {
            Some(dead_letter) => match producer(&mut problems) {
                Some(producer) => Some(DeadLetter { producer, topic: dead_letter.topic.clone() }),
                None => continue,
            },
            None => None,
        };
        let runtime = match EventRouteRuntime::new(route, destination, dead_letter, metrics.clone(), traces.clone()) {
            Ok(runtime) => Arc::new(runtime),
            Err(e) => {
                problems.push(format!("{at}: {e}"));
                continue;
            }
        };
        if let Some(http) = &spec.source.http {
            built.ingests.push((route.name_any(), http.path.clone(), Arc::new(Ingest { route: runtime })));
        } else if let Some(source) = &spec.source.kafka {
            let group = source.group.clone().unwrap_or_else(|| umw_crds::event_route::default_group(route));
            let spec_text = serde_json::to_string(spec).unwrap_or_default();
            let handler: Arc<dyn kafka::Handler> = Arc::new(KafkaSourceHandler { route: runtime });
            let plan = if in_process {
                ConsumerPlan {
                    version: version_of(&("bus", &spec_text)),
                    route: route.name_any(),
                    source: PlanSource::Bus(source.topic.clone()),
                    handler,
                    bus: Some(bus.clone()),
                }
            } else {
                let Some(connection) = settings.clone() else { continue };
                ConsumerPlan {
                    version: version_of(&(&source.topic, &group, &spec_text, &connection)),
                    route: route.name_any(),
                    source: PlanSource::Kafka(Box::new(ConsumerSettings {
                        connection,
                        topic: source.topic.clone(),
                        group,
                        route: route.name_any(),
                        from_latest: false,
                    })),
                    handler,
                    bus: None,
                }
            };
            built.consumers.push(plan);
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    *producers = used;
    built.kafka = settings;
    Ok(built)
}

/// The route that takes `POST path` to an ingest.
pub fn ingest_matcher(path: &str) -> Result<Matcher, String> {
    let matches = RouteMatch {
        path: Some(path.to_string()),
        methods: vec![umw_crds::middleware::HttpMethod::Post],
        ..RouteMatch::default()
    };
    Matcher::compile(&matches).map_err(|e| e.to_string())
}

/// How long stopping may take before the process gives up waiting for acknowledgements.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
