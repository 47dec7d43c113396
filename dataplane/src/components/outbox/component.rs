//! The outbox component: `spec.commands` compiled into command routes (with their handlers through the
//! proxy's [`Forward`] port) and `GET /commands/{id}`; the relays of the commands' table and of every
//! EventRoute with an `outbox` source, as tasks publishing through the events' [`Publish`] port; the
//! `/outbox/dead` admin endpoint. Pools are shared by equal settings and kept across reloads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::response::IntoResponse as _;
use http::{Method, StatusCode};
use kube::ResourceExt as _;
use umw_crds::event_route::EventFormat;
use umw_crds::middleware::{HttpMethod, RouteMatch};
use umw_crds::validate::duration_or;

use super::commands::{Command, CommandEndpoint, Status};
use super::memory::MemoryStore;
use super::postgres::{self, AppColumns, AppSource, AppTable, Database, PgSettings, PgStore};
use super::relay::{self, Relay};
use super::{OutboxStore, Sink};
use crate::kernel::component::{AdminHandler, AdminRoute, BuildCx, Built, Component, Env, Precedence};
use crate::kernel::config::Loaded;
use crate::kernel::endpoint::Route;
use crate::kernel::metrics::Metrics;
use crate::kernel::ports::{Forward, Publish};
use crate::kernel::problem::{Kind, Problem, kinds};
use crate::kernel::routing::Matcher;
use crate::kernel::secret::Secret;
use crate::kernel::task::{Running, TaskKey, TaskSpec, version_of};

/// A database and the command store writing to it.
#[derive(Clone)]
struct Pooled {
    database: Arc<Database>,
    store: Arc<PgStore>,
}

#[derive(Default)]
pub struct Outbox {
    databases: Arc<Mutex<HashMap<PgSettings, Pooled>>>,
    /// Commands with `--in-process-backends`.
    memory: Arc<MemoryStore>,
    /// The committed snapshot's store and admin token, for `/outbox/dead`.
    current: Arc<arc_swap::ArcSwapOption<DeadLetters>>,
}

/// What `/outbox/dead` reads, and the token it asks for.
struct DeadLetters {
    store: Arc<dyn OutboxStore>,
    token: Option<String>,
}

/// A relay the configuration asks for.
struct RelayPlan {
    key: TaskKey,
    version: u64,
    source: Arc<dyn relay::Source>,
    sink: Arc<dyn Sink>,
    settings: relay::Settings,
}

impl RelayPlan {
    fn task(self) -> TaskSpec {
        let RelayPlan { key, version, source, sink, settings } = self;
        TaskSpec::new(key, version, move |cx| {
            let health = cx.health.handle(relay::component_name(source.name()), false);
            health.activate();
            tracing::info!(table = %source.name(), "outbox relay started");
            Ok(Box::new(Relay::start(source, sink, settings, cx.metrics.clone(), health)) as Box<dyn Running>)
        })
    }
}

impl Component for Outbox {
    fn name(&self) -> &'static str {
        "outbox"
    }

    fn build(&self, config: &Loaded, cx: &mut BuildCx<'_>) -> Result<Built, Vec<String>> {
        let env = cx.env;
        let mut built = Built::default();
        built.admin.push(AdminRoute {
            method: Method::GET,
            path: "/outbox/dead",
            handler: dead_letters(self.current.clone(), env.metrics.clone()),
        });
        let bundle = &config.bundle;
        let spec = &bundle.middleware.spec;
        let outbox_routes: Vec<_> = bundle.event_routes.iter().filter(|r| r.spec.source.outbox.is_some()).collect();
        let current = self.current.clone();
        if spec.commands.is_empty() && outbox_routes.is_empty() {
            let databases = self.databases.clone();
            built.on_commit(move || {
                current.store(None);
                if let Ok(mut databases) = databases.lock() {
                    databases.clear();
                }
            });
            return Ok(built);
        }
        let at = config.origin(&format!("Middleware/{}", bundle.middleware.name_any()));
        let settings = relay::Settings {
            batch: spec.outbox.batch_size.unwrap_or(super::DEFAULT_BATCH),
            max_attempts: spec.outbox.max_attempts.unwrap_or(super::DEFAULT_MAX_ATTEMPTS),
            poll_interval: duration_or(spec.outbox.poll_interval.as_ref(), super::DEFAULT_POLL_INTERVAL),
            retention: duration_or(spec.outbox.retention.as_ref(), super::DEFAULT_RETENTION),
        };
        let Some(publish) = cx.ports.get::<dyn Publish>() else {
            return Err(vec![if spec.connections.kafka.is_some() && !env.in_process {
                // The events component could not build the producer, and said why.
                format!("{at}: commands and outbox sources are not relayed: the Kafka producer could not be built")
            } else {
                format!("{at}: commands and outbox sources are relayed to Kafka: set spec.connections.kafka")
            }]);
        };

        // The store: in memory, or PostgreSQL (its pool reused while the settings are unchanged).
        let (store, database, pg): (Arc<dyn OutboxStore>, Option<Arc<Database>>, Option<PgSettings>) = if env.in_process
        {
            (self.memory.clone(), None, None)
        } else {
            let pg = match pg_settings(config) {
                Ok(Some(pg)) => pg,
                Ok(None) => {
                    return Err(vec![format!("{at}: commands and outbox sources need spec.connections.postgres")]);
                }
                Err(e) => return Err(vec![format!("{at}: {e}")]),
            };
            let existing = self.databases.lock().ok().and_then(|d| d.get(&pg).cloned());
            let pooled = match existing {
                Some(pooled) => pooled,
                None => {
                    let database =
                        Database::new(&pg, &env.health, env.metrics.clone()).map_err(|e| vec![format!("{at}: {e}")])?;
                    let store = Arc::new(PgStore::new(database.clone(), postgres::writers(pg.max_connections)));
                    Pooled { database, store }
                }
            };
            let (database, store) = (pooled.database.clone(), pooled.store.clone());
            let databases = self.databases.clone();
            let settings = pg.clone();
            built.on_commit(move || {
                pooled.database.activate();
                if let Ok(mut databases) = databases.lock() {
                    *databases = HashMap::from([(settings, pooled)]);
                }
            });
            (store as Arc<dyn OutboxStore>, Some(database), Some(pg))
        };
        // Relays are replaced when the database, the broker or their settings change.
        let connection = version_of(&(&pg, publish.connection(), format!("{settings:?}")));
        let mut problems = Vec::new();
        if !spec.commands.is_empty() {
            built.tasks.push(
                RelayPlan {
                    key: TaskKey::new("outbox", "relay", super::COMMANDS_TABLE),
                    version: connection,
                    source: store.source(),
                    sink: publish.sink(EventFormat::Binary),
                    settings: settings.clone(),
                }
                .task(),
            );
            let forward = cx.ports.get::<dyn Forward>();
            for (i, command) in spec.commands.iter().enumerate() {
                let field = format!("{at}: spec.commands[{i}]");
                match command_route(command, &store, forward.as_deref(), env) {
                    Ok((route, handler)) => {
                        built.route(Precedence::Endpoint, route);
                        if let Some(handler) = handler {
                            built.routes.push(crate::kernel::component::RouteEntry {
                                precedence: Precedence::Internal,
                                route: handler,
                            });
                        }
                    }
                    Err((sub, e)) => problems.push(format!("{field}{sub}: {e}")),
                }
            }
            let matches = RouteMatch {
                path_prefix: Some("/commands".into()),
                methods: vec![HttpMethod::Get],
                ..Default::default()
            };
            match Matcher::compile(&matches) {
                Ok(matcher) => {
                    let status = Arc::new(Status { store: store.clone(), metrics: env.metrics.clone() });
                    let mut route = Route::new("commands-status", matcher, status, &env.metrics, &env.traces);
                    route.max_body = 0;
                    built.route(Precedence::Endpoint, route);
                }
                Err(e) => problems.push(format!("{at}: spec.commands: {e}")),
            }
        }
        for route in outbox_routes {
            let (Some(source), Some(destination)) = (&route.spec.source.outbox, &route.spec.destination.kafka) else {
                continue;
            };
            let Some(database) = &database else {
                // Application tables live in PostgreSQL; the in-process backends (and `check`) have none.
                tracing::warn!(
                    event_route = %route.name_any(),
                    "application outbox tables are relayed from PostgreSQL only: not relayed with the in-process backends"
                );
                continue;
            };
            let c = &source.columns;
            let columns = AppColumns {
                id: c.id.clone().unwrap_or_else(|| "id".into()),
                aggregate_type: c.aggregate_type.clone().unwrap_or_else(|| "aggregatetype".into()),
                aggregate_id: c.aggregate_id.clone().unwrap_or_else(|| "aggregateid".into()),
                ty: c.type_.clone().unwrap_or_else(|| "type".into()),
                payload: c.payload.clone().unwrap_or_else(|| "payload".into()),
                headers: c.headers.clone(),
                position: c.position.clone().or_else(|| c.id.clone()).unwrap_or_else(|| "id".into()),
                published_at: c.published_at.clone(),
            };
            let schema = source.schema.clone().unwrap_or_else(|| "public".into());
            let table = AppTable::new(database.clone(), &schema, &source.table, &columns, &destination.topic);
            let version = version_of(&(
                connection,
                &schema,
                &source.table,
                &columns,
                &destination.topic,
                format!("{:?}", route.spec.format),
            ));
            built.tasks.push(
                RelayPlan {
                    key: TaskKey::new("outbox", "relay", format!("{}/{schema}.{}", route.name_any(), source.table)),
                    version,
                    source: Arc::new(AppSource(Arc::new(table))),
                    sink: publish.sink(route.spec.format),
                    settings: settings.clone(),
                }
                .task(),
            );
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let token = match spec.outbox.admin_token.as_ref().map(umw_crds::config::resolve).transpose() {
            Ok(token) => token.filter(|t| !t.is_empty()),
            Err(e) => return Err(vec![format!("{at}: spec.outbox.adminToken: {e}")]),
        };
        let kept = (!spec.commands.is_empty()).then(|| Arc::new(DeadLetters { store, token }));
        built.on_commit(move || current.store(kept));
        Ok(built)
    }
}

/// A command's route and its handler's; or the field (under the command) and the problem.
type CommandRoutes = Result<(Route, Option<Arc<Route>>), (String, String)>;

/// `POST /commands/<name>`, and the route of its handler when it has one.
fn command_route(
    command: &umw_crds::middleware::Command,
    store: &Arc<dyn OutboxStore>,
    forward: Option<&dyn Forward>,
    env: &Env,
) -> CommandRoutes {
    let name = format!("command-{}", command.name);
    let path = format!("/commands/{}", command.name);
    let key = command
        .event
        .key_template
        .as_deref()
        .map(umw_crds::template::parse)
        .transpose()
        .map_err(|e| (".event.keyTemplate".to_string(), e.to_string()))?;
    let schema = match &command.schema {
        Some(schema) => Some(Arc::new(
            jsonschema::validator_for(&serde_json::Value::Object(schema.0.clone()))
                .map_err(|e| (".schema".to_string(), format!("not a valid JSON Schema: {e}")))?,
        )),
        None => None,
    };
    let idempotency = command.idempotency.clone().unwrap_or_default();
    let header = idempotency.header.as_deref().unwrap_or("Idempotency-Key");
    let idempotency_header = http::HeaderName::try_from(header)
        .map_err(|_| (".idempotency.header".to_string(), format!("{header:?} is not a header name")))?;
    let max_body = command.max_body_bytes.unwrap_or(super::DEFAULT_MAX_BODY);
    let matches = RouteMatch { path: Some(path.clone()), methods: vec![HttpMethod::Post], ..Default::default() };
    let handler = match &command.handler {
        Some(upstream) => {
            let Some(forward) = forward else {
                return Err((".handler".to_string(), "no proxy to forward to".to_string()));
            };
            let route = forward
                .route(&format!("{name}-handler"), &matches, upstream, max_body)
                .map_err(|(sub, e)| (format!(".handler{sub}"), e))?;
            Some(route)
        }
        None => None,
    };
    let endpoint = Command {
        name: command.name.clone(),
        event_type: command.event.type_.clone(),
        topic: command.event.topic.clone(),
        source: command.event.source.clone().unwrap_or_else(|| path.clone()),
        key,
        idempotency_header,
        idempotency_required: idempotency.required,
        ttl: duration_or(idempotency.ttl.as_ref(), super::DEFAULT_IDEMPOTENCY_TTL),
        handler: handler.clone(),
        store: store.clone(),
        metrics: env.metrics.clone(),
        traces: env.traces.clone(),
    };
    let matcher = Matcher::compile(&matches).map_err(|e| (".name".to_string(), e.to_string()))?;
    let mut route = Route::new(name, matcher, Arc::new(CommandEndpoint(Arc::new(endpoint))), &env.metrics, &env.traces);
    route.max_body = max_body;
    route.schema = schema;
    Ok((route, handler))
}

/// The PostgreSQL connection of the Middleware, with its Secrets resolved.
fn pg_settings(loaded: &Loaded) -> Result<Option<PgSettings>, String> {
    use super::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_STATEMENT_TIMEOUT};
    use umw_crds::config::resolve;
    let Some(pg) = &loaded.bundle.middleware.spec.connections.postgres else { return Ok(None) };
    let field = |name: &str, e: String| format!("spec.connections.postgres.{name}: {e}");
    Ok(Some(PgSettings {
        url: Secret::from(resolve(&pg.url).map_err(|e| field("url", e))?),
        ca_cert: pg.ca_cert.as_ref().map(resolve).transpose().map_err(|e| field("caCert", e))?,
        max_connections: pg.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        statement_timeout: duration_or(pg.statement_timeout.as_ref(), DEFAULT_STATEMENT_TIMEOUT),
        connect_timeout: duration_or(pg.connect_timeout.as_ref(), DEFAULT_CONNECT_TIMEOUT),
    }))
}

/// `GET /outbox/dead?limit=N`: the outbox rows that failed for good (newest first, at most 1000), with the
/// table they came from and the last error.
fn dead_letters(current: Arc<arc_swap::ArcSwapOption<DeadLetters>>, metrics: Metrics) -> AdminHandler {
    Arc::new(move |request| {
        let (current, metrics) = (current.clone(), metrics.clone());
        Box::pin(async move {
            const NO_OUTBOX: Kind =
                Kind { slug: "no-outbox", title: "This Middleware defines no commands", status: StatusCode::NOT_FOUND };
            const NO_TOKEN: Kind =
                Kind { slug: "no-admin-token", title: "No admin token is set", status: StatusCode::NOT_FOUND };
            const UNAUTHORIZED: Kind =
                Kind { slug: "unauthorized", title: "A valid admin token is needed", status: StatusCode::UNAUTHORIZED };
            let Some(dead) = current.load_full() else {
                metrics.gateway_errors.with_label_values(&["admin", "no_outbox"]).inc();
                return Problem::new(NO_OUTBOX, "the outbox exists once spec.commands is set").into_response();
            };
            let Some(token) = &dead.token else {
                metrics.gateway_errors.with_label_values(&["admin", "no_admin_token"]).inc();
                return Problem::new(NO_TOKEN, "dead-lettered rows are shown with spec.outbox.adminToken set")
                    .into_response();
            };
            let presented = crate::kernel::context::bearer_token(request.headers());
            if !crate::kernel::secret::constant_time_eq(presented.as_bytes(), token.as_bytes()) {
                metrics.gateway_errors.with_label_values(&["admin", "unauthorized"]).inc();
                return Problem::new(UNAUTHORIZED, "present spec.outbox.adminToken as a bearer token").into_response();
            }
            let store = &dead.store;
            let limit = request
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .find_map(|pair| pair.strip_prefix("limit="))
                .map(|l| l.parse::<u32>());
            let limit = match limit {
                None => 100,
                Some(Ok(limit)) if (1..=1000).contains(&limit) => limit,
                Some(_) => {
                    metrics.gateway_errors.with_label_values(&["admin", "bad_request"]).inc();
                    return Problem::new(kinds::BAD_REQUEST, "limit must be a number from 1 to 1000").into_response();
                }
            };
            match store.dead(limit).await {
                Ok(rows) => axum::Json(serde_json::json!({ "rows": rows })).into_response(),
                Err(error) => {
                    metrics.gateway_errors.with_label_values(&["admin", "outbox_unavailable"]).inc();
                    tracing::warn!(%error, "the dead-letter table could not be read");
                    Problem::new(kinds::UPSTREAM_UNAVAILABLE, "the outbox store is unavailable").into_response()
                }
            }
        })
    })
}
