//! The response cache against a real Redis: hits and misses, single-flight, TTL jitter, negative caching,
//! Vary, Cache-Control, stale-while-revalidate, and Redis failing mid-run.

#[path = "../../dataplane/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::{Gateway, Upstream, eventually, get, send};
use umw_tests::{RedisCluster, RedisServer};

fn config(upstream: &Upstream, redis: &RedisServer, rule: &str) -> String {
    format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: cache}}\nspec:\n  routes:\n    - name: products\n      match: {{pathPrefix: /}}\n      upstream: {{url: '{}'}}\n  connections:\n    redis:\n      url: {{value: '{}'}}\n---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: products, namespace: cache}}\nspec:\n  targetRefs: [{{name: shop, sectionName: products}}]\n  rules:\n  - {rule}\n",
        upstream.url(),
        redis.url()
    )
}

async fn redis_ready(gw: &Gateway) {
    eventually("the redis component up", Duration::from_secs(10), || async {
        let status = gw.status().await;
        status["components"].as_array().unwrap().iter().any(|c| c["name"] == "redis" && c["state"] == "Up")
    })
    .await;
}

fn cache_status(reply: &support::Reply) -> String {
    reply.headers.get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

/// Asks until the answer is a hit. An entry is written after its response: a request arriving meanwhile
/// shares the response in flight (`collapsed`) and is asked again; anything else (a miss, which went upstream)
/// fails the test.
async fn hit(url: &str, headers: &[(&str, &str)]) -> support::Reply {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let reply = send(Method::GET, url, headers, Bytes::new()).await;
        let status = cache_status(&reply);
        if status.starts_with("umw; hit") {
            return reply;
        }
        assert!(status.ends_with("collapsed"), "{url}: expected a hit, got {status:?}");
        assert!(tokio::time::Instant::now() < deadline, "{url}: still not stored after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_stored_in_redis_and_the_next_request_is_a_hit() {
    let redis = RedisServer::start();
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up, &redis, "{ttl: 30s, jitterPercent: 0}")).await;
    redis_ready(&gw).await;
    let first = get(&gw.url("/respond?x=1")).await;
    assert_eq!(first.status, 200);
    assert_eq!(cache_status(&first), "umw; fwd=miss; stored");
    eventually("the entry in Redis", Duration::from_secs(5), || async {
        let keys: Vec<String> = redis::cmd("KEYS").arg("umw:cache/shop:*").query(&mut redis.connection()).unwrap();
        keys.len() == 1
    })
    .await;
    let second = get(&gw.url("/respond?x=1")).await;
    assert!(cache_status(&second).starts_with("umw; hit; ttl="), "{}", cache_status(&second));
    assert_eq!(second.body, first.body, "the same response, from the cache");
    assert!(second.headers.contains_key("age"));
    assert_eq!(up.hits(), 1);
    // Another query string is another key.
    assert_eq!(cache_status(&get(&gw.url("/respond?x=2")).await), "umw; fwd=miss; stored");
    assert_eq!(up.hits(), 2);
    assert_eq!(gw.metric("umw_cache_requests_total", &["result=\"hit\""]).await, 1.0);
    // POST is never cached.
    let post = send(Method::POST, &gw.url("/respond?x=1"), &[], Bytes::new()).await;
    assert!(!post.headers.contains_key("cache-status"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_make_one_upstream_request() {
    let redis = RedisServer::start();
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up, &redis, "{ttl: 30s}")).await;
    redis_ready(&gw).await;
    let client = support::client();
    let url = gw.url("/respond?sleep=300&cold=1");
    let requests = (0..1000).map(|_| {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move { support::send_with(&client, Method::GET, &url, &[], Bytes::new()).await })
    });
    let replies = futures::future::join_all(requests).await;
    let mut bodies = std::collections::BTreeSet::new();
    for reply in replies {
        let reply = reply.unwrap();
        assert_eq!(reply.status, 200);
        bodies.insert(reply.body.clone());
    }
    let errors = gw.metric("umw_cache_backend_errors_total", &[]).await;
    // A request whose Redis read failed (on a machine loaded by other tests some reads exceed the 250 ms
    // operation timeout and count as backend errors) and that arrives after the shared flight ended cannot
    // see the stored entry: it goes upstream itself. Without backend errors, exactly one upstream request.
    let allowed = if errors > 0.0 { 2 } else { 1 };
    assert!(
        up.hits() >= 1 && up.hits() <= allowed,
        "one upstream request for the cold key, got {} (cache backend errors: {errors})\n{}",
        up.hits(),
        gw.metrics().await.lines().filter(|l| l.starts_with("umw_cache")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(bodies.len(), up.hits(), "everyone got the response of the one upstream request (or the extra one)");
    let coalesced = gw.metric("umw_cache_requests_total", &["result=\"coalesced\""]).await;
    let hits = gw.metric("umw_cache_requests_total", &["result=\"hit\""]).await;
    assert_eq!(coalesced + hits, 1000.0 - up.hits() as f64, "the others waited for it or found it stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttls_spread_within_the_jitter_and_negative_answers_keep_their_own_ttl() {
    let redis = RedisServer::start();
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up, &redis, "{ttl: 100s, jitterPercent: 20, negativeTtl: 5s}")).await;
    redis_ready(&gw).await;
    for i in 0..50 {
        assert_eq!(get(&gw.url(&format!("/respond?n={i}"))).await.status, 200);
    }
    assert_eq!(get(&gw.url("/respond?status=404")).await.status, 404);
    assert_eq!(get(&gw.url("/respond?status=500")).await.status, 500);
    let mut ttls = Vec::new();
    eventually("51 entries in Redis", Duration::from_secs(5), || async {
        let keys: Vec<String> = redis::cmd("KEYS").arg("umw:cache/shop:*").query(&mut redis.connection()).unwrap();
        keys.len() == 51
    })
    .await;
    let mut connection = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS").arg("umw:cache/shop:*").query(&mut connection).unwrap();
    let mut negative = None;
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut connection).unwrap();
        if key.contains("status=404") {
            negative = Some(ttl);
        } else {
            ttls.push(ttl);
        }
    }
    assert!(ttls.iter().all(|t| (95_000..=120_000).contains(t)), "within 100 s + 20 %: {ttls:?}");
    let spread = ttls.iter().max().unwrap() - ttls.iter().min().unwrap();
    assert!(spread > 5_000, "entries stored together do not expire together: spread {spread} ms");
    let negative = negative.expect("the 404 is kept");
    assert!((1..=6_000).contains(&negative), "the 404 keeps the negative TTL: {negative}");
    assert!(!keys.iter().any(|k| k.contains("status=500")), "a 500 is not kept");
    assert_eq!(cache_status(&get(&gw.url("/respond?status=404")).await).split(';').nth(1).unwrap().trim(), "hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_and_cache_control_are_honoured() {
    let redis = RedisServer::start();
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up, &redis, "{ttl: 60s}")).await;
    redis_ready(&gw).await;
    let url = gw.url("/respond?vary=accept-language");
    let lang = |l: &'static str| {
        let url = url.clone();
        async move { send(Method::GET, &url, &[("accept-language", l)], Bytes::new()).await }
    };
    let en = lang("en").await;
    assert!(support::Reply::text(&en).ends_with("lang=en"));
    hit(&url, &[("accept-language", "en")]).await;
    let de = lang("de").await;
    assert!(de.text().ends_with("lang=de"), "another variant, not the English one: {}", de.text());
    hit(&url, &[("accept-language", "de")]).await;
    let en_again = hit(&url, &[("accept-language", "en")]).await;
    assert!(en_again.text().ends_with("lang=en"));
    assert_eq!(up.hits(), 2);

    // The response's directives.
    for (query, stored) in [
        ("cache-control=no-store", false),
        ("cache-control=private", false),
        ("set-cookie=a%3Db", false),
        ("cache-control=public%2C%20s-maxage%3D30", true),
    ] {
        let url = gw.url(&format!("/respond?{query}"));
        get(&url).await;
        if stored {
            hit(&url, &[]).await;
        } else {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let again = cache_status(&get(&url).await);
            assert!(!again.contains("hit"), "{query} is not stored: {again}");
        }
    }
    let mut connection = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*s-maxage*").query(&mut connection).unwrap();
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query(&mut connection).unwrap();
    assert!(ttl <= 30_000, "s-maxage wins over the rule's TTL: {ttl}");

    // The request's directives: no-store bypasses, no-cache goes upstream and refreshes.
    let before = up.hits();
    let bypass = send(Method::GET, &gw.url("/respond?x=1"), &[("cache-control", "no-store")], Bytes::new()).await;
    assert_eq!(cache_status(&bypass), "umw; fwd=bypass");
    let authorized = send(Method::GET, &gw.url("/respond?x=1"), &[("authorization", "Bearer t")], Bytes::new()).await;
    assert_eq!(cache_status(&authorized), "umw; fwd=bypass", "credentials are never served from a shared cache");
    assert_eq!(up.hits(), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entries_are_served_while_one_request_refreshes_them() {
    let redis = RedisServer::start();
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up, &redis, "{ttl: 1s, jitterPercent: 0, staleWhileRevalidate: 30s}")).await;
    redis_ready(&gw).await;
    let first = get(&gw.url("/respond?s=1")).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let stale = get(&gw.url("/respond?s=1")).await;
    assert!(cache_status(&stale).contains("stale-while-revalidate"), "{}", cache_status(&stale));
    assert_eq!(stale.body, first.body, "the stale entry, at once");
    eventually("the refresh upstream", Duration::from_secs(5), || async { up.hits() == 2 }).await;
    // The refreshed entry is written after the refresh's response: stale answers until then.
    eventually("the refreshed response served fresh", Duration::from_secs(5), || async {
        let fresh = get(&gw.url("/respond?s=1")).await;
        cache_status(&fresh).contains("hit; ttl=") && fresh.body != first.body
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_requests_go_to_the_upstream_and_caching_resumes_when_it_is_back() {
    let mut redis = RedisServer::start();
    let up = Upstream::start("up").await;
    let gw = Gateway::start(&config(&up, &redis, "{ttl: 60s}")).await;
    redis_ready(&gw).await;
    get(&gw.url("/respond?k=1")).await;
    hit(&gw.url("/respond?k=1"), &[]).await;

    redis.kill();
    let started = std::time::Instant::now();
    for i in 0..20 {
        let reply = get(&gw.url(&format!("/respond?down={i}"))).await;
        assert_eq!(reply.status, 200, "served by the upstream while Redis is down");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no request waits long on a dead Redis: {:?}",
        started.elapsed()
    );
    assert!(gw.metric("umw_cache_backend_errors_total", &["backend=\"redis\""]).await > 0.0);
    eventually("redis Degraded in /status", Duration::from_secs(10), || async {
        let status = gw.status().await;
        status["components"].as_array().unwrap().iter().any(|c| c["name"] == "redis" && c["state"] != "Up")
    })
    .await;
    // With the breaker open, responses say that nothing was stored.
    let reply = get(&gw.url("/respond?down=x")).await;
    assert_eq!(cache_status(&reply), "umw; fwd=miss; detail=cache-unavailable");
    // Single-flight still protects the upstream while Redis is away.
    let before = up.hits();
    let client = support::client();
    let url = gw.url("/respond?sleep=1000&down=herd");
    let herd = (0..200).map(|_| {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move { support::send_with(&client, Method::GET, &url, &[], Bytes::new()).await })
    });
    for reply in futures::future::join_all(herd).await {
        assert_eq!(reply.unwrap().status, 200);
    }
    // Without a cache to find the response in, only requests that arrive while the first is in flight
    // share it: on a loaded machine one straggler may start a second flight (without single-flight: 200).
    let upstream = up.hits() - before;
    assert!(
        (1..=2).contains(&upstream),
        "200 concurrent requests for a cold key, Redis down: {upstream} upstream requests"
    );

    redis.restart();
    eventually("caching again", Duration::from_secs(30), || async {
        let url = gw.url("/respond?back=1");
        get(&url).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        cache_status(&get(&url).await).contains("hit")
    })
    .await;
    let status = gw.status().await;
    assert!(
        status["components"].as_array().unwrap().iter().any(|c| c["name"] == "redis" && c["state"] == "Up"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_holds_the_entries_across_its_masters() {
    let cluster = RedisCluster::start();
    let up = Upstream::start("up").await;
    let yaml = format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: cache}}\nspec:\n  routes:\n    - name: products\n      match: {{pathPrefix: /}}\n      upstream: {{url: '{}'}}\n  connections:\n    redis:\n      url: {{value: '{}'}}\n      mode: cluster\n---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: products, namespace: cache}}\nspec:\n  targetRefs: [{{name: shop}}]\n  rules:\n  - {{ttl: 60s}}\n",
        up.url(),
        cluster.url()
    );
    let gw = Gateway::start(&yaml).await;
    redis_ready(&gw).await;
    for i in 0..30 {
        assert_eq!(cache_status(&get(&gw.url(&format!("/respond?c={i}"))).await), "umw; fwd=miss; stored");
    }
    eventually("30 entries in the cluster", Duration::from_secs(5), || async {
        cluster.keys_per_node("umw:*").iter().sum::<usize>() == 30
    })
    .await;
    let per_node = cluster.keys_per_node("umw:*");
    assert!(per_node.iter().all(|n| *n > 0), "spread over the masters: {per_node:?}");
    for i in 0..30 {
        assert!(cache_status(&get(&gw.url(&format!("/respond?c={i}"))).await).contains("hit"));
    }
    assert_eq!(up.hits(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_behind_tls_with_a_password_and_a_private_authority_holds_the_entries() {
    let redis = RedisServer::start_tls("s3cret");
    let up = Upstream::start("up").await;
    let ca: String = redis.ca_cert.as_deref().unwrap().lines().map(|l| format!("          {l}\n")).collect();
    let ca = format!("      caCert:\n        value: |\n{ca}");
    let connection = |password: &str, ca: &str| {
        format!(
            "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: cache}}\nspec:\n  routes:\n    - name: products\n      match: {{pathPrefix: /}}\n      upstream: {{url: '{}'}}\n  connections:\n    redis:\n      url: {{value: '{}'}}\n      password: {{value: {password}}}\n{ca}---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: products, namespace: cache}}\nspec:\n  targetRefs: [{{name: shop}}]\n  rules:\n  - {{ttl: 60s}}\n",
            up.url(),
            redis.url()
        )
    };
    // A wrong password, or no trust in the private authority: no connection, the component says why, and
    // requests still succeed from the upstream.
    for (password, ca) in [("wrong", ca.as_str()), ("s3cret", "")] {
        let gw = Gateway::start(&connection(password, ca)).await;
        eventually("the redis component down, saying why", Duration::from_secs(10), || async {
            let status = gw.status().await;
            status["components"].as_array().unwrap().iter().any(|c| {
                c["name"] == "redis"
                    && c["state"] == "Down"
                    && c["message"].as_str().unwrap_or("").contains("cannot connect")
            })
        })
        .await;
        let reply = get(&gw.url("/respond?t=1")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(cache_status(&reply), "umw; fwd=miss; detail=cache-unavailable");
    }

    let gw = Gateway::start(&connection("s3cret", &ca)).await;
    redis_ready(&gw).await;
    assert_eq!(cache_status(&get(&gw.url("/respond?t=1")).await), "umw; fwd=miss; stored");
    // The entry is written after the response; the next request is a hit once it is there.
    eventually("the entry in Redis", Duration::from_secs(5), || async {
        let keys: Vec<String> = redis::cmd("KEYS").arg("umw:*").query(&mut redis.connection()).unwrap();
        keys.len() == 1
    })
    .await;
    hit(&gw.url("/respond?t=1"), &[]).await;
    assert_eq!(up.hits(), 3, "one request per gateway went upstream, the hit did not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_invalidated_by_key_prefix_and_tag_through_the_authenticated_admin_api() {
    let redis = RedisServer::start();
    let up = Upstream::start("up").await;
    let yaml = format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: cache}}\nspec:\n  routes:\n    - name: all\n      match: {{pathPrefix: /}}\n      upstream: {{url: '{}'}}\n  connections:\n    redis:\n      url: {{value: '{}'}}\n---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: products, namespace: cache}}\nspec:\n  targetRefs: [{{name: shop}}]\n  rules:\n  - ttl: 60s\n    tags: ['product:{{{{ path.1 }}}}']\n  invalidation:\n    adminApi: true\n    adminToken: {{value: s3cret}}\n",
        up.url(),
        redis.url()
    );
    let gw = Gateway::start(&yaml).await;
    redis_ready(&gw).await;
    let paths = ["/products/1", "/products/2", "/products/3", "/other/x"];
    for path in paths {
        get(&gw.url(path)).await;
    }
    stored(&redis, "umw:cache/shop:GET:*", paths.len()).await;
    for path in paths {
        assert!(cache_status(&get(&gw.url(path)).await).contains("hit"), "{path} is cached");
    }
    let admin = format!("http://{}/cache/invalidate", gw.admin);
    let invalidate = |token: &'static str, body: &'static str| {
        let admin = admin.clone();
        async move {
            let auth = format!("bearer {token}"); // the scheme is case-insensitive
            send(
                Method::POST,
                &admin,
                &[("authorization", auth.as_str()), ("content-type", "application/json")],
                Bytes::from_static(body.as_bytes()),
            )
            .await
        }
    };
    let refused = invalidate("wrong", r#"{"tags": ["product:1"]}"#).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["type"], "https://umw.dev/problems/unauthorized");
    assert_eq!(invalidate("s3cret", r#"{"tagz": []}"#).await.status, 400, "unknown fields are refused");
    assert_eq!(invalidate("s3cret", r#"{}"#).await.status, 400, "nothing named");
    let everything = invalidate("s3cret", r#"{"prefixes": [""]}"#).await;
    assert_eq!(everything.status, 400, "an empty prefix would delete every entry");
    assert_eq!(gw.metric("umw_gateway_errors_total", &["route=\"admin\"", "kind=\"bad_request\""]).await, 3.0);

    let by_tag = invalidate("s3cret", r#"{"tags": ["product:1"]}"#).await;
    assert_eq!(by_tag.json()["deleted"], 1, "{}", by_tag.text());
    assert!(cache_status(&get(&gw.url("/products/1")).await).contains("miss"));
    assert!(cache_status(&get(&gw.url("/products/2")).await).contains("hit"), "other tags stay");

    let by_key = invalidate("s3cret", r#"{"keys": ["GET:127.0.0.1/other/x"]}"#).await;
    assert_eq!(by_key.json()["deleted"], 1, "{}", by_key.text());
    let by_prefix = invalidate("s3cret", r#"{"prefixes": ["GET:127.0.0.1/products/"]}"#).await;
    assert!(by_prefix.json()["deleted"].as_u64().unwrap() >= 2, "{}", by_prefix.text());
    for path in ["/products/2", "/products/3", "/other/x"] {
        assert!(cache_status(&get(&gw.url(path)).await).contains("miss"), "{path} was invalidated");
    }
    assert!(gw.metric("umw_cache_invalidations_total", &["by=\"tag\""]).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_fills_the_cache_before_the_pod_is_ready_and_refreshes_it_on_its_interval() {
    let redis = RedisServer::start();
    let up = Upstream::start("up").await;
    let yaml = format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: cache}}\nspec:\n  routes:\n    - name: all\n      match: {{pathPrefix: /}}\n      upstream: {{url: '{}'}}\n  connections:\n    redis:\n      url: {{value: '{}'}}\n---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: products, namespace: cache}}\nspec:\n  targetRefs: [{{name: shop}}]\n  rules:\n  - ttl: 60s\n  warmup:\n    paths: ['/respond?sleep=700&w=1', 'http://shop.example/respond?w=2']\n    interval: 2s\n",
        up.url(),
        redis.url()
    );
    let gw = Gateway::start(&yaml).await;
    let early = get(&format!("http://{}/readyz", gw.admin)).await;
    assert_eq!(early.status, 503, "not ready while warming: {}", early.text());
    assert!(early.text().contains("cache warm-up"), "{}", early.text());
    eventually("ready after the warm-up", Duration::from_secs(10), || async {
        get(&format!("http://{}/readyz", gw.admin)).await.status == 200
    })
    .await;
    assert_eq!(up.hits(), 2, "both paths fetched once");
    let warmed = send(Method::GET, &gw.url("/respond?w=2"), &[("host", "shop.example")], Bytes::new()).await;
    assert!(cache_status(&warmed).contains("hit"), "served from the warm-up: {}", cache_status(&warmed));
    eventually("a refresh on the interval", Duration::from_secs(10), || async { up.hits() >= 4 }).await;
    assert_eq!(gw.metric("umw_cache_warmups_total", &["outcome=\"error\""]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_single_flight_makes_one_upstream_request_across_replicas() {
    let redis = RedisServer::start();
    let up = Upstream::start("up").await;
    let rule = "{ttl: 60s, singleFlight: {distributed: true, lockTimeout: 5s}}";
    let a = Gateway::start(&config(&up, &redis, rule)).await;
    let b = Gateway::start(&config(&up, &redis, rule)).await;
    redis_ready(&a).await;
    redis_ready(&b).await;
    let client = support::client();
    let requests = (0..200).map(|i| {
        let client = client.clone();
        let url = if i % 2 == 0 { a.url("/respond?sleep=500&d=1") } else { b.url("/respond?sleep=500&d=1") };
        tokio::spawn(async move { support::send_with(&client, Method::GET, &url, &[], Bytes::new()).await })
    });
    let replies = futures::future::join_all(requests).await;
    assert!(replies.iter().all(|r| r.as_ref().unwrap().status == 200));
    assert_eq!(up.hits(), 1, "one upstream request for both replicas");
    let locks: Vec<String> = redis::cmd("KEYS").arg("*|lock").query(&mut redis.connection()).unwrap();
    assert!(locks.is_empty(), "the lock is released: {locks:?}");

    // A holder that dies cannot stall the others longer than lockTimeout: a lock nobody releases.
    let _: () = redis::cmd("SET")
        .arg("umw:cache/shop:GET:127.0.0.1/respond?d=2|lock")
        .arg("dead")
        .arg("PX")
        .arg(1000)
        .query(&mut redis.connection())
        .unwrap();
    let started = std::time::Instant::now();
    let reply = get(&a.url("/respond?d=2")).await;
    assert_eq!(reply.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited at most for the lock's expiry: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_tier_stays_coherent_across_replicas_through_redis_pub_sub() {
    let redis = RedisServer::start();
    let up = Upstream::start("up").await;
    let yaml = format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: cache}}\nspec:\n  routes:\n    - name: all\n      match: {{pathPrefix: /}}\n      upstream: {{url: '{}'}}\n  connections:\n    redis:\n      url: {{value: '{}'}}\n---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: products, namespace: cache}}\nspec:\n  targetRefs: [{{name: shop}}]\n  backend: tiered\n  rules:\n  - ttl: 60s\n  invalidation:\n    adminApi: true\n    adminToken: {{value: t}}\n",
        up.url(),
        redis.url()
    );
    let a = Gateway::start(&yaml).await;
    let b = Gateway::start(&yaml).await;
    redis_ready(&a).await;
    redis_ready(&b).await;
    // Give both subscriptions a moment to be up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = get(&a.url("/respond?t=1")).await;
    stored(&redis, "umw:cache/shop:GET:*", 1).await;
    let from_b = get(&b.url("/respond?t=1")).await;
    assert!(cache_status(&from_b).contains("hit"), "B reads A's entry from Redis: {}", cache_status(&from_b));
    assert_eq!(from_b.body, first.body);
    assert_eq!(up.hits(), 1);

    // Now B holds it in its in-process tier. Invalidate through A: B must drop its copy too.
    let auth = "Bearer t";
    let reply = send(
        Method::POST,
        &format!("http://{}/cache/invalidate", a.admin),
        &[("authorization", auth)],
        Bytes::from_static(br#"{"keys": ["GET:127.0.0.1/respond?t=1"]}"#),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    eventually("B's copy dropped", Duration::from_secs(5), || async {
        cache_status(&get(&b.url("/respond?t=1")).await).contains("miss")
    })
    .await;
    assert_eq!(up.hits(), 2, "B went upstream once after the invalidation");

    // A refresh on one replica replaces the others' copies (they drop theirs and read the new one).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let newest = send(Method::GET, &a.url("/respond?t=1"), &[("cache-control", "no-cache")], Bytes::new()).await;
    eventually("B serves the refreshed entry", Duration::from_secs(5), || async {
        get(&b.url("/respond?t=1")).await.body == newest.body
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_on_a_kafka_topic_invalidate_entries_by_tag_and_key() {
    let redis = RedisServer::start();
    let kafka = tokio::task::spawn_blocking(umw_tests::KafkaBroker::start).await.unwrap();
    kafka.create_topic("catalog", 2);
    let up = Upstream::start("up").await;
    let yaml = format!(
        "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {{name: shop, namespace: cache}}\nspec:\n  routes:\n    - name: products\n      match: {{pathPrefix: /}}\n      upstream: {{url: '{}'}}\n  connections:\n    redis:\n      url: {{value: '{}'}}\n    kafka:\n      bootstrapServers: {{value: '{}'}}\n---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: products, namespace: cache}}\nspec:\n  targetRefs: [{{name: shop}}]\n  rules:\n  - {{ttl: 5m, tags: ['product:{{{{ path.1 }}}}']}}\n  invalidation:\n    events:\n    - {{topic: catalog, eventType: product.changed, tagTemplate: 'product:{{{{ data.id }}}}'}}\n    - {{topic: catalog, eventType: page.changed, keyTemplate: 'GET:127.0.0.1{{{{ data.path }}}}'}}\n",
        up.url(),
        redis.url(),
        kafka.bootstrap()
    );
    let gw = Gateway::start(&yaml).await;
    redis_ready(&gw).await;
    eventually("the invalidation consumer has its partitions", Duration::from_secs(30), || async {
        gw.metric("umw_events_rebalances_total", &["event_route=\"cache-products\"", "kind=\"assign\""]).await >= 1.0
    })
    .await;
    for path in ["/products/42", "/products/7", "/about"] {
        get(&gw.url(path)).await;
    }
    stored(&redis, "umw:cache/shop:GET:*", 3).await;
    for path in ["/products/42", "/products/7", "/about"] {
        assert!(cache_status(&get(&gw.url(path)).await).contains("hit"), "{path} is cached");
    }
    // Events as another service would publish them: CloudEvents in binary mode.
    let bootstrap = kafka.bootstrap();
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
        let producer: BaseProducer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("a producer");
        for (id, ty, data) in
            [("e-1", "product.changed", r#"{"id": "42"}"#), ("e-2", "page.changed", r#"{"path": "/about"}"#)]
        {
            let headers = rdkafka::message::OwnedHeaders::new()
                .insert(rdkafka::message::Header { key: "ce_specversion", value: Some("1.0") })
                .insert(rdkafka::message::Header { key: "ce_id", value: Some(id) })
                .insert(rdkafka::message::Header { key: "ce_type", value: Some(ty) })
                .insert(rdkafka::message::Header { key: "ce_source", value: Some("/catalog") })
                .insert(rdkafka::message::Header { key: "content-type", value: Some("application/json") });
            producer.send(BaseRecord::to("catalog").key(id).payload(data).headers(headers)).expect("queued");
        }
        producer.flush(Duration::from_secs(10)).expect("acknowledged");
    })
    .await
    .unwrap();
    // A refetched entry is stored again: each path needs to show its miss once.
    for path in ["/products/42", "/about"] {
        eventually(&format!("{path} invalidated"), Duration::from_secs(20), || async {
            cache_status(&get(&gw.url(path)).await).contains("fwd=miss")
        })
        .await;
    }
    assert!(cache_status(&get(&gw.url("/products/7")).await).contains("hit"), "other entries stay");
    assert!(gw.metric("umw_cache_invalidations_total", &["by=\"tag\""]).await >= 1.0);
    assert!(gw.metric("umw_cache_invalidations_total", &["by=\"key\""]).await >= 1.0);
    assert_eq!(
        gw.metric("umw_events_handled_total", &["event_route=\"cache-products\"", "outcome=\"delivered\""]).await,
        2.0,
        "each event counted"
    );
    // Every pod reads every event without a consumer group: none is left on the broker per pod or reload.
    let bootstrap = kafka.bootstrap();
    let groups = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let client: BaseConsumer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("a client");
        let list = client.fetch_group_list(None, Duration::from_secs(10)).expect("the broker lists its groups");
        list.groups().iter().map(|g| g.name().to_string()).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(groups.is_empty(), "no consumer group on the broker: {groups:?}");
}

/// Waits until Redis holds at least `n` keys matching `pattern` (the entries stored in the background).
async fn stored(redis: &RedisServer, pattern: &str, n: usize) {
    eventually(&format!("{n} entries stored"), Duration::from_secs(5), || async {
        let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut redis.connection()).unwrap();
        keys.len() >= n
    })
    .await;
}

/// How many SCANs the Redis server has run.
fn scans(redis: &RedisServer) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut redis.connection()).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_scan:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_a_key_takes_its_variants_without_scanning_the_keyspace() {
    let redis = RedisServer::start();
    let up = Upstream::start("up").await;
    let yaml =
        config(&up, &redis, "{ttl: 60s}") + "  invalidation:\n    adminApi: true\n    adminToken: {value: s3cret}\n";
    let gw = Gateway::start(&yaml).await;
    redis_ready(&gw).await;
    let url = gw.url("/respond?vary=accept-language");
    for lang in ["en", "de"] {
        send(Method::GET, &url, &[("accept-language", lang)], Bytes::new()).await;
        hit(&url, &[("accept-language", lang)]).await;
    }
    let before = scans(&redis);
    let reply = send(
        Method::POST,
        &format!("http://{}/cache/invalidate", gw.admin),
        &[("authorization", "Bearer s3cret"), ("content-type", "application/json")],
        Bytes::from_static(br#"{"keys": ["GET:127.0.0.1/respond?vary=accept-language"]}"#),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["deleted"], 3, "the entry's marker and both variants: {}", reply.text());
    assert_eq!(scans(&redis), before, "no SCAN of the keyspace");
    for lang in ["en", "de"] {
        let again = send(Method::GET, &url, &[("accept-language", lang)], Bytes::new()).await;
        assert!(cache_status(&again).contains("miss"), "{lang}: {}", cache_status(&again));
    }
}
