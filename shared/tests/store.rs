//! One behaviour suite for every `Store` implementation, run against a fresh SQLite file and a
//! fresh Postgres database (the real server on 127.0.0.1:5432, or `PARLEY_TEST_POSTGRES_URL`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;

use serde_json::{Map, Value, json};
use shared::store::{self, NewAnswer, Page, Role, Store, TenantSettings};
use sqlx::{Connection, Executor, PgConnection};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn map(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn page(offset: i64, limit: i64, descending: bool) -> Page {
    Page {
        offset,
        limit,
        descending,
    }
}

fn admin_url() -> String {
    std::env::var("PARLEY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A Postgres database of its own for one test; returns its URL and name.
async fn fresh_postgres() -> Result<(String, String), sqlx::Error> {
    let admin = admin_url();
    let name = format!("parley_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&admin).await?;
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Ok((format!("{base}/{name}"), name))
}

async fn drop_database(name: &str) {
    if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
        let _ = conn
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .await;
    }
}

async fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    (store::connect(&url).await.unwrap(), dir)
}

async fn postgres() -> (Arc<dyn Store>, String) {
    let (url, name) = fresh_postgres().await.unwrap();
    (store::connect(&url).await.unwrap(), name)
}

async fn tenants_round_trip(s: Arc<dyn Store>) -> TestResult {
    let settings = TenantSettings {
        max_connections: 7,
        ..TenantSettings::default()
    };
    let t = s.create_tenant("acme", &settings, "hash-1").await?;
    assert_eq!(
        s.get_tenant(t.id).await?.unwrap().settings.max_connections,
        7
    );
    assert_eq!(s.tenant_by_key_hash("hash-1").await?.unwrap().id, t.id);
    assert!(s.tenant_by_key_hash("hash-2").await?.is_none());
    let renamed = s.update_tenant(t.id, Some("acme2"), None).await?.unwrap();
    assert_eq!(
        (renamed.name.as_str(), renamed.settings.max_connections),
        ("acme2", 7)
    );
    assert!(s.set_tenant_key(t.id, "hash-2").await?);
    assert!(s.tenant_by_key_hash("hash-1").await?.is_none());
    assert_eq!(s.list_tenants().await?.len(), 1);
    assert!(s.delete_tenant(t.id).await?);
    assert!(s.get_tenant(t.id).await?.is_none());
    assert!(!s.delete_tenant(t.id).await?);
    Ok(())
}

async fn chats_and_messages(s: Arc<dyn Store>) -> TestResult {
    let t = s
        .create_tenant("t", &TenantSettings::default(), "h")
        .await?;
    let other = s
        .create_tenant("o", &TenantSettings::default(), "h2")
        .await?;
    assert!(!s.user_exists(t.id, "u").await?);
    let c1 = s
        .create_chat(t.id, "u", "one", &map(json!({"k": 1})))
        .await?;
    let c2 = s.create_chat(t.id, "u", "two", &Map::new()).await?;
    assert!(s.user_exists(t.id, "u").await?);
    assert!(
        !s.ensure_user(t.id, "u").await?,
        "the chat created the user"
    );
    assert!(s.ensure_user(t.id, "v").await?);
    assert_eq!(s.join_chat(t.id, c1.id, "w").await?, Some(true));
    assert_eq!(s.join_chat(t.id, c1.id, "w").await?, Some(false));
    assert_eq!(
        s.join_chat(other.id, c1.id, "x").await?,
        None,
        "another tenant's chat"
    );
    assert!(
        !s.user_exists(other.id, "x").await?,
        "no user without a chat"
    );
    assert!(
        s.get_chat(other.id, c1.id).await?.is_none(),
        "tenants are isolated"
    );
    let (list, total) = s.list_user_chats(t.id, "u", page(0, 1, true)).await?;
    assert_eq!((list[0].id, total), (c2.id, 2));
    let (list, _) = s.list_user_chats(t.id, "u", page(0, 10, false)).await?;
    assert_eq!(
        list.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![c1.id, c2.id]
    );

    let m1 = s
        .add_user_message(c1.id, "u", "hello", &map(json!({"a": "b"})))
        .await?;
    let answer = NewAnswer {
        id: "msg-answer".into(),
        chat_id: c1.id,
        user_id: "u".into(),
        reply_to: m1.id.clone(),
        content: "hi".into(),
        metadata: map(json!({"model": "m", "tokens_used": 1})),
    };
    assert!(s.add_answer(&answer).await?);
    let again = NewAnswer {
        id: "msg-answer-2".into(),
        ..answer.clone()
    };
    assert!(
        !s.add_answer(&again).await?,
        "a message is answered at most once"
    );
    let m2 = s.add_user_message(c1.id, "u", "more", &Map::new()).await?;
    assert_eq!(s.answer_to(&m1.id).await?.unwrap().content, "hi");
    assert!(s.answer_to(&m2.id).await?.is_none());

    let chat = s.get_chat(t.id, c1.id).await?.unwrap();
    assert_eq!(chat.message_count, 3);
    assert!(chat.last_message_at.is_some());
    let (msgs, total) = s.list_messages(c1.id, page(0, 10, false)).await?;
    assert_eq!(total, 3);
    assert_eq!(
        msgs.iter().map(|m| m.role).collect::<Vec<_>>(),
        vec![Role::User, Role::Assistant, Role::User]
    );
    assert_eq!(msgs[0].metadata, map(json!({"a": "b"})));
    let (msgs, _) = s.list_messages(c1.id, page(1, 1, true)).await?;
    assert_eq!(msgs[0].id, "msg-answer");
    let history = s.history_before(c1.id, &m2.id, 10).await?;
    assert_eq!(
        history
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>(),
        vec!["hello", "hi"]
    );
    assert_eq!(s.history_before(c1.id, &m2.id, 1).await?[0].content, "hi");
    let pending = s.unanswered(chrono::Utc::now(), 10).await?;
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].message_id.as_str(), pending[0].tenant_id),
        (m2.id.as_str(), t.id)
    );
    let long_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    assert!(
        s.unanswered(long_ago, 10).await?.is_empty(),
        "only older messages"
    );
    // A message given up on is not queued again.
    s.give_up(&m2.id).await?;
    assert!(s.unanswered(chrono::Utc::now(), 10).await?.is_empty());
    // `seq` blocks: a chat is created with the first one; each reservation ends past the
    // previous one; a missing chat has none.
    let first = shared::broker::seqs::FIRST.limit;
    assert_eq!(s.reserve_seq(c1.id, 100).await?, Some(first + 100));
    assert_eq!(s.reserve_seq(c1.id, 100).await?, Some(first + 200));
    assert_eq!(s.reserve_seq(uuid::Uuid::new_v4(), 100).await?, None);

    assert!(s.delete_chat(t.id, c1.id).await?);
    assert!(s.get_chat(t.id, c1.id).await?.is_none());
    assert_eq!(
        s.list_messages(c1.id, page(0, 10, false)).await?.1,
        0,
        "messages go with the chat"
    );
    assert!(!s.delete_chat(other.id, c2.id).await?);
    assert!(s.delete_tenant(t.id).await?);
    assert!(
        s.get_chat(t.id, c2.id).await?.is_none(),
        "chats go with the tenant"
    );
    Ok(())
}

async fn hostile_text_round_trips(s: Arc<dyn Store>) -> TestResult {
    let t = s
        .create_tenant("t", &TenantSettings::default(), "h")
        .await?;
    let hostile = "' OR 1=1 --; DROP TABLE chats; \u{1F600} \"quoted\"";
    let c = s
        .create_chat(t.id, hostile, hostile, &map(json!({"x": hostile})))
        .await?;
    let m = s
        .add_user_message(c.id, hostile, hostile, &Map::new())
        .await?;
    let (list, _) = s.list_user_chats(t.id, hostile, page(0, 5, true)).await?;
    assert_eq!(
        (list[0].user_id.as_str(), list[0].title.as_str()),
        (hostile, hostile)
    );
    assert_eq!(
        s.list_messages(c.id, page(0, 5, false)).await?.0[0].content,
        m.content
    );
    Ok(())
}

async fn usage_adds_up_by_day(s: Arc<dyn Store>) -> TestResult {
    use chrono::NaiveDate;
    use shared::store::DailyUsage;
    let t = s
        .create_tenant("t", &TenantSettings::default(), "h")
        .await?;
    let day = |d| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
    let u = |d, p, c| DailyUsage::from_row(day(d), 1, p, c);
    s.add_usage(t.id, &u(29, 1, 2)).await?;
    s.add_usage(t.id, &u(30, 10, 20)).await?;
    s.add_usage(t.id, &u(30, 5, 5)).await?;
    let days = s.usage(t.id, day(1), day(30)).await?;
    assert_eq!(days.len(), 2);
    assert_eq!(days[0].date, day(29));
    assert_eq!(
        (
            days[1].messages,
            days[1].prompt_tokens,
            days[1].completion_tokens,
            days[1].total_tokens
        ),
        (2, 15, 25, 40)
    );
    assert_eq!(s.usage(t.id, day(30), day(30)).await?.len(), 1);
    s.delete_tenant(t.id).await?;
    assert!(
        s.usage(t.id, day(1), day(30)).await?.is_empty(),
        "usage goes with its tenant"
    );
    // A worker's late flush for the deleted tenant is taken and dropped, not retried forever.
    s.add_usage(t.id, &u(30, 1, 1)).await?;
    assert!(s.usage(t.id, day(1), day(30)).await?.is_empty());
    Ok(())
}

/// Many writers at once: the store batches them, every row gets its own outcome, a row whose
/// chat was deleted fails alone, a message is answered once however many answers race, and
/// the counters match the rows.
async fn concurrent_writes_keep_their_own_outcomes(s: Arc<dyn Store>) -> TestResult {
    let t = s
        .create_tenant("t", &TenantSettings::default(), "h")
        .await?;
    let mut chats = Vec::new();
    for i in 0..20 {
        chats.push(
            s.create_chat(t.id, "u", &format!("c{i}"), &Map::new())
                .await?,
        );
    }
    let gone = s.create_chat(t.id, "u", "gone", &Map::new()).await?;
    s.delete_chat(t.id, gone.id).await?;
    let writes = chats
        .iter()
        .flat_map(|c| (0..10).map(move |n| (c.id, n)))
        .map(|(chat, n)| {
            let s = s.clone();
            async move {
                s.add_user_message(chat, "u", &format!("m{n}"), &Map::new())
                    .await
            }
        });
    let none = Map::new();
    let doomed = s.add_user_message(gone.id, "u", "lost", &none);
    let (saved, doomed) = tokio::join!(futures_util::future::join_all(writes), doomed);
    assert!(doomed.is_err(), "a message to a deleted chat is refused");
    let saved = saved.into_iter().collect::<Result<Vec<_>, _>>()?;
    assert_eq!(saved.len(), 200);

    let question = &saved[0];
    let answers = (0..5).map(|i| {
        let s = s.clone();
        let answer = NewAnswer {
            id: format!("msg_race{i}"),
            chat_id: question.chat_id,
            user_id: "u".into(),
            reply_to: question.id.clone(),
            content: format!("answer {i}"),
            metadata: Map::new(),
        };
        async move { s.add_answer(&answer).await }
    });
    let won = futures_util::future::join_all(answers)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "one answer wins");

    for c in &chats {
        let (list, total) = s.list_messages(c.id, page(0, 100, false)).await?;
        let expected = if c.id == question.chat_id { 11 } else { 10 };
        assert_eq!((list.len() as i64, total), (expected, expected));
        let chat = s.get_chat(t.id, c.id).await?.expect("chat");
        assert_eq!(chat.message_count, expected, "counters match the rows");
    }
    Ok(())
}

macro_rules! suite {
    ($($name:ident),*) => {
        mod on_sqlite {
            use super::*;
            $(#[tokio::test] async fn $name() -> TestResult { let (s, _dir) = sqlite().await; super::$name(s).await })*
        }
        mod on_postgres {
            use super::*;
            $(#[tokio::test] async fn $name() -> TestResult {
                let (s, db) = postgres().await;
                let result = super::$name(s).await;
                drop_database(&db).await;
                result
            })*
        }
    };
}

suite!(
    tenants_round_trip,
    chats_and_messages,
    hostile_text_round_trips,
    usage_adds_up_by_day,
    concurrent_writes_keep_their_own_outcomes
);
