//! A private Apache Kafka broker (KRaft, one node) on loopback, started through
//! `e2e/testenv/kafka.sh start` (jars from Maven Central, cached by `make testenv`); stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};

use crate::ports;

pub struct KafkaBroker {
    /// The address clients connect to: 127.0.0.1 unless started with [`KafkaBroker::start_on`].
    pub host: String,
    pub port: u16,
    controller_port: u16,
    /// Keep both ports for this broker (restarts included).
    _ports: [ports::Port; 2],
    dir: PathBuf,
    child: Option<Child>,
    /// Times the broker started (its log keeps the lines of earlier runs).
    started: usize,
    /// SASL/PLAIN user and password clients use, when the broker requires them.
    pub sasl: Option<(String, String)>,
    /// With TLS only: the authority's certificate (PEM) that signed the broker's.
    pub ca_cert: Option<String>,
}

/// A record read back from a topic.
#[derive(Clone, Debug)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub value: Vec<u8>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// This crate's directory: the one `cargo test` names when it runs the test (a binary reused from a
/// shared target directory may have been compiled in a clone elsewhere), else the one compiled in.
fn crate_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

fn script() -> PathBuf {
    crate_dir().join("../e2e/testenv/kafka.sh")
}

impl KafkaBroker {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1")
    }

    /// A broker whose clients connect to `host`, an address of this machine (e.g. the real node's bridge
    /// address, which pods reach); its controller stays on loopback.
    pub fn start_on(host: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("umw-kafka-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir).expect("a temp directory");
        let (port, controller) = (ports::reserve_on(host), ports::reserve());
        let mut broker = Self {
            host: host.to_string(),
            port: port.get(),
            controller_port: controller.get(),
            _ports: [port, controller],
            dir,
            child: None,
            started: 0,
            sasl: None,
            ca_cert: None,
        };
        broker.spawn();
        broker
    }

    /// A broker whose clients must authenticate with SASL/PLAIN as `user`.
    pub fn start_sasl(user: &str, password: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("umw-kafka-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir).expect("a temp directory");
        let sasl = Some((user.to_string(), password.to_string()));
        let (port, controller) = (ports::reserve(), ports::reserve());
        let mut broker = Self {
            host: "127.0.0.1".into(),
            port: port.get(),
            controller_port: controller.get(),
            _ports: [port, controller],
            dir,
            child: None,
            started: 0,
            sasl,
            ca_cert: None,
        };
        broker.spawn();
        broker
    }

    /// A broker that speaks TLS only, with a certificate for 127.0.0.1 from a private authority.
    pub fn start_tls() -> Self {
        let dir = std::env::temp_dir().join(format!("umw-kafka-{}-{}", std::process::id(), fastrand::u32(..)));
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).expect("a temp directory");
        crate::make_certificates(&certs);
        let read = |name: &str| std::fs::read_to_string(certs.join(name)).expect("a certificate file");
        // Kafka's PEM key store: the private key and the certificate chain in one file.
        std::fs::write(certs.join("server.pem"), format!("{}{}", read("server.key"), read("server.crt"))).unwrap();
        let ca_cert = Some(read("ca.crt"));
        let (port, controller) = (ports::reserve(), ports::reserve());
        let mut broker = Self {
            host: "127.0.0.1".into(),
            port: port.get(),
            controller_port: controller.get(),
            _ports: [port, controller],
            dir,
            child: None,
            started: 0,
            sasl: None,
            ca_cert,
        };
        broker.spawn();
        broker
    }

    /// A client configuration for this broker (with its credentials).
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap());
        if let Some(ca) = &self.ca_cert {
            config.set("security.protocol", "ssl").set("ssl.ca.pem", ca);
        }
        if let Some((user, password)) = &self.sasl {
            config
                .set("security.protocol", "sasl_plaintext")
                .set("sasl.mechanism", "PLAIN")
                .set("sasl.username", user)
                .set("sasl.password", password);
        }
        config
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("broker.out")).expect("the broker's output file");
        let mut command = Command::new("bash");
        command.env("KAFKA_HOST", &self.host);
        if let Some((user, password)) = &self.sasl {
            command.env("KAFKA_SASL_PLAIN_USERS", format!("{user}:{password}"));
        }
        if self.ca_cert.is_some() {
            command.env("KAFKA_TLS_DIR", self.dir.join("certs"));
        }
        let child = command
            .arg(script())
            .args([
                "start",
                &self.dir.join("broker").to_string_lossy(),
                &self.port.to_string(),
                &self.controller_port.to_string(),
            ])
            .stdout(Stdio::from(log.try_clone().expect("a second handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run e2e/testenv/kafka.sh ({e})"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        let ready = self.dir.join("broker/kafka.log");
        loop {
            if std::fs::read_to_string(&ready).is_ok_and(|l| l.matches("Kafka Server started").count() > self.starts())
            {
                break;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let out = std::fs::read_to_string(self.dir.join("broker.out")).unwrap_or_default();
                panic!("the Kafka broker exited ({status}); install Java 17 and Maven, and run `make testenv`:\n{out}");
            }
            assert!(
                Instant::now() < deadline,
                "the Kafka broker did not start within 120 s (log: {})",
                ready.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.started += 1;
    }

    fn starts(&self) -> usize {
        self.started
    }

    pub fn bootstrap(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Creates a topic (one replica). Blocks; runs its own client on a thread of its own.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        let config = self.client_config();
        let name = name.to_string();
        std::thread::spawn(move || {
            let admin: AdminClient<DefaultClientContext> = config.create().expect("an admin client");
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            let topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            let results = runtime.block_on(admin.create_topics([&topic], &options)).expect("create_topics");
            for result in results {
                if let Err((topic, error)) = result {
                    panic!("creating topic {topic}: {error}");
                }
            }
        })
        .join()
        .expect("creating the topic");
    }

    /// Produces `count` records (`value(i)`, keyed `k<i % keys>`), waiting for every acknowledgement.
    pub fn produce(&self, topic: &str, count: usize, keys: usize, value: impl Fn(usize) -> String) {
        produce(&self.bootstrap(), topic, count, keys, value);
    }

    /// Every record of the topic, reading until `count` are in or `timeout` passes.
    pub fn read(&self, topic: &str, count: usize, timeout: Duration) -> Vec<Record> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", format!("umw-test-reader-{}", fastrand::u64(..)))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("a reader");
        consumer.subscribe(&[topic]).expect("subscribing");
        let deadline = Instant::now() + timeout;
        let mut records = Vec::new();
        while records.len() < count && Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
                records.push(Record {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    headers: message
                        .headers()
                        .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
                        .unwrap_or_default(),
                    value: message.payload().unwrap_or_default().to_vec(),
                });
            }
        }
        records
    }

    /// Kills the broker (SIGKILL, as a crash would); its data stays for [`KafkaBroker::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Produces `count` records to the broker at `bootstrap` (`value(i)`, keyed `k<i % keys>`), waiting for
/// every acknowledgement.
pub fn produce(bootstrap: &str, topic: &str, count: usize, keys: usize, value: impl Fn(usize) -> String) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("a producer");
    for i in 0..count {
        let key = format!("k{}", i % keys.max(1));
        let payload = value(i);
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("every record acknowledged");
}
