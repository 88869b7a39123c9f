//! The chat log's contract on both wirings: the in-process log and the Redis one (the real
//! server on 127.0.0.1:6379, or `PARLEY_TEST_REDIS_URL`, under a key prefix of its own), with
//! `seq` reservations in a real SQLite store. Fencing is the Redis log's alone: the in-process
//! broker has one worker, whose attempts never overlap.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use serde_json::Map;
use shared::broker::{
    self, Broker, BrokerError, Deletion, Fence, PublishOptions, Read, Role, seqs,
};
use shared::config::Config;
use shared::protocol::{ErrorCode, ServerEvent};
use shared::store::{self, Store, TenantSettings};
use uuid::Uuid;

struct Fixture {
    broker: Arc<dyn Broker>,
    store: Arc<dyn Store>,
    config: Config,
    tenant: Uuid,
    chat: Uuid,
    _dir: tempfile::TempDir,
}

async fn fixture(redis: bool) -> Fixture {
    fixture_with(redis, Config::default()).await
}

async fn fixture_with(redis: bool, base: Config) -> Fixture {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    let store: Arc<dyn Store> = store::connect(&url).await.unwrap();
    let tenant = store
        .create_tenant("t", &TenantSettings::default(), "hash")
        .await
        .unwrap();
    let chat = store
        .create_chat(tenant.id, "u", "c", &Map::new())
        .await
        .unwrap();
    let config = Config {
        redis_url: redis.then(|| {
            std::env::var("PARLEY_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
        }),
        redis_prefix: format!("test-log-{}:", Uuid::new_v4().simple()),
        ..base
    };
    let broker = broker::connect(&config, store.clone(), Role::Gateway)
        .await
        .unwrap();
    // As the gateway does when it creates a chat.
    broker.adopt(chat.id, seqs::FIRST).await.unwrap();
    Fixture {
        broker,
        store,
        config,
        tenant: tenant.id,
        chat: chat.id,
        _dir: dir,
    }
}

fn tokens(f: &Fixture, answer: &str, texts: &[&str]) -> Vec<ServerEvent> {
    texts
        .iter()
        .map(|t| ServerEvent::token(f.chat, answer, *t))
        .collect()
}

fn fenced<'a>(message_id: &'a str, attempt: u32, batch: u32) -> PublishOptions<'a> {
    PublishOptions {
        fence: Some(Fence {
            message_id,
            attempt,
            batch,
        }),
        first_token_trace: None,
    }
}

async fn texts(f: &Fixture) -> Vec<(u64, String)> {
    let Read::Events { events, .. } = f.broker.read(f.chat, 0, 1000).await.unwrap() else {
        panic!("log unavailable");
    };
    events
        .into_iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.frame).unwrap();
            assert_eq!(v["seq"], e.seq, "the frame carries its seq");
            (e.seq, v["token"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn seqs_are_consecutive_across_batches_and_reads_return_them_in_order() {
    for redis in [false, true] {
        let f = fixture(redis).await;
        let last = f
            .broker
            .publish(
                f.chat,
                &tokens(&f, "a", &["x", "y"]),
                PublishOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(last, 2);
        let last = f
            .broker
            .publish(f.chat, &tokens(&f, "a", &["z"]), PublishOptions::default())
            .await
            .unwrap();
        assert_eq!(last, 3);
        let got = texts(&f).await;
        assert_eq!(
            got,
            vec![(1, "x".into()), (2, "y".into()), (3, "z".into())],
            "redis: {redis}"
        );
        let Read::Events { events, latest } = f.broker.read(f.chat, 2, 10).await.unwrap() else {
            panic!("log unavailable");
        };
        assert_eq!((events.len(), events[0].seq, latest), (1, 3, 3));
    }
}

#[tokio::test]
async fn a_taken_over_attempt_is_fenced_and_a_repeated_batch_is_applied_once() {
    let f = fixture(true).await;
    let b = &f.broker;
    b.publish(f.chat, &tokens(&f, "a1", &["one"]), fenced("m1", 1, 1))
        .await
        .unwrap();
    // The same batch again (its reply was lost): not appended twice.
    assert_eq!(
        b.publish(f.chat, &tokens(&f, "a1", &["one"]), fenced("m1", 1, 1))
            .await
            .unwrap(),
        0
    );
    b.publish(f.chat, &tokens(&f, "a1", &["two"]), fenced("m1", 1, 2))
        .await
        .unwrap();
    // Attempt 2 takes over; attempt 1 can no longer publish, on its next batch or a later one.
    b.publish(f.chat, &tokens(&f, "a1", &["again"]), fenced("m1", 2, 1))
        .await
        .unwrap();
    for batch in [3, 4] {
        let refused = b
            .publish(
                f.chat,
                &tokens(&f, "a1", &["zombie"]),
                fenced("m1", 1, batch),
            )
            .await;
        assert!(
            matches!(refused, Err(BrokerError::Fenced { attempt: 1 })),
            "{refused:?}"
        );
    }
    // The next message's answer publishes; the old attempt stays fenced after it.
    b.publish(f.chat, &tokens(&f, "a2", &["next"]), fenced("m2", 1, 1))
        .await
        .unwrap();
    let refused = b
        .publish(f.chat, &tokens(&f, "a1", &["zombie"]), fenced("m1", 1, 5))
        .await;
    assert!(matches!(refused, Err(BrokerError::Fenced { .. })));
    // Attempt 2 of m1 publishing after m2 (a sweep's late retry) is still its own attempt.
    b.publish(f.chat, &tokens(&f, "a1", &["late"]), fenced("m1", 2, 2))
        .await
        .unwrap();
    let got: Vec<String> = texts(&f).await.into_iter().map(|(_, t)| t).collect();
    assert_eq!(got, ["one", "two", "again", "next", "late"]);
}

#[tokio::test]
async fn a_log_beyond_both_bounds_is_trimmed_and_reads_before_it_are_unavailable() {
    for redis in [false, true] {
        let mut config = Config::default();
        config.delivery.log_events = 100;
        config.delivery.log_secs = 0;
        let f = fixture_with(redis, config).await;
        // Answers of 10 tokens, each closed by an error: 30 of them, 330 events.
        for _ in 0..30 {
            let mut events = tokens(&f, "a", &["t"; 10]);
            events.push(ServerEvent::error(ErrorCode::AiError, "x"));
            f.broker
                .publish(f.chat, &events, PublishOptions::default())
                .await
                .unwrap();
        }
        assert!(
            matches!(
                f.broker.read(f.chat, 0, 10).await.unwrap(),
                Read::Unavailable { latest: 330 }
            ),
            "redis: {redis}"
        );
        // The last 100 events stay readable.
        let Read::Events { events, latest } = f.broker.read(f.chat, 230, 1000).await.unwrap()
        else {
            panic!("the last log_events events were trimmed (redis: {redis})");
        };
        assert_eq!((events.len(), latest), (100, 330));
    }
}

#[tokio::test]
async fn a_chat_whose_first_block_was_not_handed_over_starts_after_it() {
    for redis in [false, true] {
        let f = fixture(redis).await;
        let other = f
            .store
            .create_chat(f.tenant, "u", "not adopted", &Map::new())
            .await
            .unwrap();
        // Its INSERT reserved the first block; a log that never got it reserves the next.
        let head = f.broker.head(other.id).await.unwrap();
        assert_eq!(head.latest, seqs::BLOCK, "redis: {redis}");
        let last = f
            .broker
            .publish(
                other.id,
                &tokens(&f, "a", &["x"]),
                PublishOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(last, seqs::BLOCK + 1);
        // An adopted chat starts at 0.
        assert_eq!(f.broker.head(f.chat).await.unwrap().latest, 0);
    }
}

#[tokio::test]
async fn a_deleted_chat_is_announced_to_every_process_and_its_log_is_gone() {
    for redis in [false, true] {
        let f = fixture(redis).await;
        // A second process on the same Redis (in-process: the same broker).
        let peer = if redis {
            broker::connect(&f.config, f.store.clone(), Role::Gateway)
                .await
                .unwrap()
        } else {
            f.broker.clone()
        };
        let mut told = peer.deletions();
        // The peer's pub/sub is live once a subscription is.
        let _live = peer.subscribe(Uuid::new_v4()).await.unwrap();
        f.broker
            .publish(f.chat, &tokens(&f, "a", &["x"]), PublishOptions::default())
            .await
            .unwrap();
        assert!(f.store.delete_chat(f.tenant, f.chat).await.unwrap());
        f.broker.forget(f.chat).await.unwrap();
        let announced = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match told.recv().await.unwrap() {
                    Deletion::Chat(c) => return c,
                    Deletion::Missed => {}
                }
            }
        })
        .await
        .expect("the deletion reaches the peer");
        assert_eq!(announced, f.chat, "redis: {redis}");
        // Its log is dropped: a late socket finds no chat rather than an old head.
        let head = peer.head(f.chat).await;
        assert!(
            matches!(head, Err(BrokerError::NoSuchChat(c)) if c == f.chat),
            "redis: {redis}: {head:?}"
        );
    }
}

/// A tenant's answer permits are shared by every worker on the Redis: the cap holds across two
/// processes, a renewal keeps a permit, a release frees it, and a permit nobody renews (its
/// worker died) lapses within the worker lease.
#[tokio::test]
async fn answer_permits_hold_across_workers_and_lapse_when_not_renewed() {
    let mut base = Config::default();
    base.delivery.worker_lease_ms = 1_500;
    let f = fixture_with(true, base).await;
    let other = broker::connect(&f.config, f.store.clone(), Role::Worker)
        .await
        .unwrap();
    let t = f.tenant;
    assert!(f.broker.take_permit(t, "job-1", 2).await.unwrap());
    assert!(other.take_permit(t, "job-2", 2).await.unwrap());
    assert!(!other.take_permit(t, "job-3", 2).await.unwrap(), "the cap");
    // The holder of a permit keeps it (a job taken over keeps its delivery id).
    assert!(other.take_permit(t, "job-1", 2).await.unwrap());
    f.broker.release_permit(t, "job-2").await.unwrap();
    assert!(
        other.take_permit(t, "job-3", 2).await.unwrap(),
        "freed by a release"
    );
    // job-3 is renewed past the lease; job-1 is left to lapse.
    for _ in 0..4 {
        tokio::time::sleep(f.broker.permit_renewal().unwrap()).await;
        other.renew_permit(t, "job-3").await.unwrap();
    }
    assert!(
        other.take_permit(t, "job-4", 2).await.unwrap(),
        "job-1 lapsed"
    );
    assert!(
        !other.take_permit(t, "job-5", 2).await.unwrap(),
        "job-3 was kept"
    );
}
