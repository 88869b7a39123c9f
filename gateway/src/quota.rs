//! Daily token quotas: a tenant whose settings carry `daily_token_quota` has its chat messages
//! refused with `QUOTA_EXCEEDED` once the day's usage (UTC) reaches it.
//!
//! Usage is read from the store at most once per second per tenant and gateway, so tenants
//! without a quota cost nothing and a burst may overshoot by what one second of answers uses.

use std::time::{Duration, Instant};

use chrono::Utc;
use dashmap::DashMap;
use shared::store::{Store, StoreError};
use uuid::Uuid;

/// How long a reading of a tenant's usage is trusted.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// Today's usage per tenant, briefly cached.
#[derive(Default)]
pub struct Quotas {
    spent: DashMap<Uuid, (Instant, u64)>,
}

impl Quotas {
    /// Whether the tenant has used `quota` tokens or more today.
    pub async fn exhausted(
        &self,
        store: &dyn Store,
        tenant_id: Uuid,
        quota: u64,
    ) -> Result<bool, StoreError> {
        if let Some(entry) = self.spent.get(&tenant_id)
            && entry.0.elapsed() < FRESH_FOR
        {
            return Ok(entry.1 >= quota);
        }
        let today = Utc::now().date_naive();
        let used = store
            .usage(tenant_id, today, today)
            .await?
            .first()
            .map_or(0, |d| d.total_tokens);
        self.spent.insert(tenant_id, (Instant::now(), used));
        Ok(used >= quota)
    }
}
