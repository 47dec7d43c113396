//! The events component: EventRoutes compiled into ingest routes and consumer tasks, producers shared by
//! equal settings and kept across reloads (each flushed at shutdown), and the [`Publish`] and
//! [`Subscribe`] ports over the Middleware's Kafka (or the in-process bus).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudevents::AttributesReader as _;
use futures::future::BoxFuture;
use kube::ResourceExt as _;
use umw_crds::event_route::EventFormat;
use umw_crds::template::Part;

use super::build::{self, ConsumerPlan, PlanSource, Producers};
use super::bus::{BusConsumer, InProcessBus, Publisher};
use super::envelope::{self, Format};
use super::kafka::{self, ConsumerSettings, Incoming, KafkaSettings, Producer, PublishError};
use crate::kernel::component::{BuildCx, Built, Component, Precedence};
use crate::kernel::config::Loaded;
use crate::kernel::endpoint::Route;
use crate::kernel::ports::{
    Delivery, EventHandler, EventView, Group, Publish, Record, Sink, SinkError, Subscribe, Subscription,
};
use crate::kernel::task::{Running, TaskCx, TaskKey, TaskSpec, Wave, version_of};

#[derive(Default)]
pub struct Events {
    /// The producers of the committed snapshot, by settings.
    producers: Arc<Mutex<Producers>>,
    /// Topics with `--in-process-backends`.
    bus: Arc<InProcessBus>,
}

impl Component for Events {
    fn name(&self) -> &'static str {
        "events"
    }

    fn build(&self, config: &Loaded, cx: &mut BuildCx<'_>) -> Result<Built, Vec<String>> {
        let env = cx.env;
        let mut producers = self.producers.lock().map(|p| p.clone()).unwrap_or_default();
        let events = build::build(
            config,
            &mut producers,
            &self.bus,
            &env.clients,
            &env.health,
            &env.metrics,
            &env.traces,
            env.in_process,
        )?;
        let mut built = Built::default();
        let mut problems = Vec::new();
        for (name, path, ingest) in events.ingests {
            match build::ingest_matcher(&path) {
                Ok(matcher) => {
                    built.route(
                        Precedence::Endpoint,
                        Route::new(format!("events-{name}"), matcher, ingest, &env.metrics, &env.traces),
                    );
                }
                Err(e) => problems
                    .push(format!("{}: spec.source.http.path: {e}", config.origin(&format!("EventRoute/{name}")))),
            }
        }
        for plan in events.consumers {
            built.tasks.push(consumer_task(TaskKey::new("events", "consumer", plan.route.clone()), plan));
        }
        // The ports, over the bus or the Middleware's Kafka.
        let at = config.origin(&format!("Middleware/{}", config.bundle.middleware.name_any()));
        if env.in_process {
            cx.ports.provide::<dyn Publish>(Arc::new(Publishing { publisher: self.bus.clone(), connection: 0 }));
            cx.ports.provide::<dyn Subscribe>(Arc::new(Subscribing { via: Via::Bus(self.bus.clone()) }));
        } else if let Some(settings) = events.kafka {
            let producer = match producers.get(&settings) {
                Some(producer) => Some(producer.clone()),
                None => match Producer::new(&settings, &env.health, env.metrics.clone()) {
                    Ok(producer) => Some(Arc::new(producer)),
                    Err(e) => {
                        problems.push(format!("{at}: {e}"));
                        None
                    }
                },
            };
            if let Some(producer) = producer {
                producers.insert(settings.clone(), producer.clone());
                let connection = version_of(&settings);
                cx.ports.provide::<dyn Publish>(Arc::new(Publishing { publisher: producer, connection }));
            }
            cx.ports.provide::<dyn Subscribe>(Arc::new(Subscribing { via: Via::Kafka(Box::new(settings)) }));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        for (settings, producer) in &producers {
            let producer = producer.clone();
            let key = TaskKey::new("events", "producer", settings.client_id.clone());
            built.tasks.push(
                TaskSpec::new(key, version_of(settings), move |_| Ok(Box::new(Flushing(producer)) as Box<dyn Running>))
                    .in_wave(Wave::Flush),
            );
        }
        let pool = self.producers.clone();
        built.on_commit(move || {
            for producer in producers.values() {
                producer.activate();
            }
            if let Ok(mut pool) = pool.lock() {
                *pool = producers;
            }
        });
        Ok(built)
    }
}

/// A consumer of an EventRoute or of a subscription, as a task.
fn consumer_task(key: TaskKey, plan: ConsumerPlan) -> TaskSpec {
    TaskSpec::new(key, plan.version, move |cx: &TaskCx| -> Result<Box<dyn Running>, String> {
        match &plan.source {
            PlanSource::Bus(topic) => Ok(Box::new(OnBus {
                _consumer: BusConsumer::start(bus_of(&plan)?.as_ref(), topic, plan.handler.clone()),
            })),
            PlanSource::Kafka(settings) => {
                let health = cx.health.handle(kafka::COMPONENT, false);
                health.activate();
                let consumer =
                    kafka::Consumer::start(settings, plan.handler.clone(), health, cx.metrics.clone(), None)?;
                tracing::info!(route = %plan.route, "consumer started");
                Ok(Box::new(OnKafka(consumer)))
            }
        }
    })
}

fn bus_of(plan: &ConsumerPlan) -> Result<Arc<InProcessBus>, String> {
    plan.bus.clone().ok_or_else(|| "no in-process bus".to_string())
}

/// Runs until dropped.
struct OnBus {
    _consumer: BusConsumer,
}

impl Running for OnBus {
    fn stop(self: Box<Self>, _deadline: Instant) -> BoxFuture<'static, ()> {
        drop(self);
        Box::pin(async {})
    }
}

struct OnKafka(kafka::Consumer);

impl Running for OnKafka {
    fn stop(self: Box<Self>, deadline: Instant) -> BoxFuture<'static, ()> {
        let wait = deadline.saturating_duration_since(Instant::now());
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || self.0.stop_within(wait)).await;
        })
    }
}

/// A producer's place in the shutdown: it waits for the acknowledgements of what it was handed.
struct Flushing(Arc<Producer>);

impl Running for Flushing {
    fn stop(self: Box<Self>, deadline: Instant) -> BoxFuture<'static, ()> {
        let wait = deadline.saturating_duration_since(Instant::now()).min(build::FLUSH_TIMEOUT);
        Box::pin(async move {
            let producer = self.0;
            let flushed = tokio::task::spawn_blocking(move || producer.flush(wait)).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "events still unacknowledged at shutdown");
            }
        })
    }
}

/// The [`Publish`] port.
struct Publishing {
    publisher: Arc<dyn Publisher>,
    connection: u64,
}

impl Publish for Publishing {
    fn sink(&self, format: EventFormat) -> Arc<dyn Sink> {
        Arc::new(EventSink { publisher: self.publisher.clone(), format: super::format_of(format) })
    }

    fn connection(&self) -> u64 {
        self.connection
    }
}

/// Records published as CloudEvents.
struct EventSink {
    publisher: Arc<dyn Publisher>,
    format: Format,
}

impl Sink for EventSink {
    fn publish<'a>(&'a self, record: &'a Record) -> BoxFuture<'a, Result<(), SinkError>> {
        use cloudevents::{EventBuilder as _, EventBuilderV10};
        Box::pin(async move {
            let mut builder = EventBuilderV10::new().id(&record.id).ty(&record.ty).source(record.source.as_str());
            if let Some(subject) = &record.subject {
                builder = builder.subject(subject.as_str());
            }
            if let Some(time) = record.time.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) {
                builder = builder.time(time.with_timezone(&chrono::Utc));
            }
            for (name, value) in &record.extensions {
                builder = builder.extension(name, value.as_str());
            }
            let content_type = record.content_type.as_deref().unwrap_or("application/octet-stream");
            builder = builder.data(content_type, record.data.clone());
            let event = builder.build().map_err(|e| SinkError::Refused(format!("not a valid CloudEvent: {e}")))?;
            let mut wire = envelope::to_kafka(&event, self.format).map_err(SinkError::Refused)?;
            wire.headers.extend(record.headers.iter().cloned());
            let key = record.key.as_deref().map(str::as_bytes);
            match self.publisher.publish(&record.topic, key, &wire).await {
                Ok(_) => Ok(()),
                Err(PublishError::Refused(e)) => Err(SinkError::Refused(e)),
                Err(PublishError::Failed(e)) => Err(SinkError::Failed(e)),
                // A timeout is the broker going away with the record in flight, not the record's fault.
                Err(error @ (PublishError::TimedOut(_) | PublishError::Unavailable(_) | PublishError::Full(_))) => {
                    Err(SinkError::Unavailable(error.to_string()))
                }
            }
        })
    }
}

enum Via {
    Bus(Arc<InProcessBus>),
    Kafka(Box<KafkaSettings>),
}

/// The [`Subscribe`] port.
struct Subscribing {
    via: Via,
}

impl Subscribe for Subscribing {
    fn subscribe(
        &self,
        key: TaskKey,
        version: u64,
        subscription: Subscription,
        handler: Arc<dyn EventHandler>,
    ) -> TaskSpec {
        let handler: Arc<dyn kafka::Handler> = Arc::new(Subscriber { handler, owner: subscription.owner.clone() });
        let plan = match &self.via {
            Via::Bus(bus) => ConsumerPlan {
                version,
                route: subscription.owner.clone(),
                source: PlanSource::Bus(subscription.topic.clone()),
                handler,
                bus: Some(bus.clone()),
            },
            Via::Kafka(connection) => {
                // Every pod reads every event: no consumer group (none left behind per pod or reload).
                let Group::Broadcast = subscription.group;
                let group = String::new();
                ConsumerPlan {
                    version: version_of(&(version, &subscription, connection.as_ref())),
                    route: subscription.owner.clone(),
                    source: PlanSource::Kafka(Box::new(ConsumerSettings {
                        connection: connection.as_ref().clone(),
                        topic: subscription.topic.clone(),
                        group,
                        route: subscription.owner.clone(),
                        from_latest: true,
                    })),
                    handler,
                    bus: None,
                }
            }
        };
        consumer_task(key, plan)
    }
}

/// A subscriber's handler behind a consumer: every message becomes a [`Delivery`], and is done with once
/// the handler returns.
struct Subscriber {
    handler: Arc<dyn EventHandler>,
    owner: String,
}

impl kafka::Handler for Subscriber {
    fn handle(&self, message: Incoming, _stopping: Arc<std::sync::atomic::AtomicBool>) -> BoxFuture<'static, bool> {
        let event = envelope::from_kafka(message.headers.clone(), message.payload.clone())
            .or_else(|_| envelope::plain(&message, &self.owner))
            .map(|event| Box::new(View(event)) as Box<dyn EventView>);
        let delivery = Delivery { topic: message.topic.clone(), offset: message.offset, event };
        let handled = self.handler.handle(delivery);
        Box::pin(async move {
            handled.await;
            true
        })
    }
}

struct View(cloudevents::Event);

impl EventView for View {
    fn event_type(&self) -> &str {
        self.0.ty()
    }

    fn render(&self, template: &[Part]) -> String {
        super::render_event(template, &self.0)
    }
}

/// How long [`Flushing`] waits at most.
pub const FLUSH_TIMEOUT: Duration = build::FLUSH_TIMEOUT;
