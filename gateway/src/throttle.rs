//! Throttling of failed authentications per source address (REST keys, WebSocket keys, the
//! admin token), so that guessing keys or tokens is slow and a flood of made-up keys from one
//! place costs next to nothing.
//!
//! Each failure takes one from the address's allowance (`auth.failure_burst`, refilled at
//! `auth.failures_per_minute`, a `governor` keyed limiter). An address with none left is refused
//! before any lookup until it has one again, even with a valid key: the attempt cannot be told
//! apart without the lookup the throttle exists to save. Successes cost nothing. IPv6 addresses
//! count by their /64 prefix, which one host usually holds whole.
//!
//! The source address is the peer's, unless the peer is a trusted proxy
//! (`auth.trusted_proxies`): then it is the last `X-Forwarded-For` hop that is not one.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    num::NonZeroU32,
    time::{Duration, Instant},
};

use actix_web::http::header::HeaderMap;
use dashmap::DashMap;
use governor::{
    Quota, RateLimiter, clock::Clock, clock::DefaultClock, middleware::StateInformationMiddleware,
};
use ipnet::IpNet;
use shared::config::AuthConfig;

use crate::error::ApiError;

/// Addresses tracked before the idle ones are forgotten.
const MAX_TRACKED: usize = 100_000;

/// A configured trusted proxy that is neither an address nor a CIDR range.
#[derive(Debug, thiserror::Error)]
#[error("auth.trusted_proxies: '{0}' is not an IP address or CIDR range")]
pub struct BadProxy(String);

/// Failed authentications per source address.
pub struct AuthThrottle {
    limiter: governor::DefaultKeyedRateLimiter<IpAddr, StateInformationMiddleware>,
    /// How long one failure takes to be forgiven.
    refill: Duration,
    /// Addresses out of allowance, until when.
    blocked: DashMap<IpAddr, Instant>,
    trusted: Vec<IpNet>,
}

impl AuthThrottle {
    /// A throttle with the configured allowance and trusted proxies.
    pub fn new(config: &AuthConfig) -> Result<Self, BadProxy> {
        let per_minute = NonZeroU32::new(config.failures_per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.failure_burst).unwrap_or(NonZeroU32::MIN);
        Ok(Self {
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst))
                .with_middleware::<StateInformationMiddleware>(),
            refill: Duration::from_secs(60) / per_minute.get(),
            blocked: DashMap::new(),
            trusted: parse_proxies(&config.trusted_proxies)?,
        })
    }

    /// The address a request comes from (see the module doc); `None` when the peer is unknown.
    pub fn client_addr(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = canonical(peer?.ip());
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map_while(|hop| hop.trim().parse::<IpAddr>().ok())
            .map(canonical)
            .collect();
        let client = hops.iter().rev().find(|hop| !self.is_trusted(**hop));
        Some(client.or(hops.first()).copied().unwrap_or(peer))
    }

    /// Runs an authentication for `addr`: refused at once while the address is throttled, and
    /// a failure (`InvalidKey`, `Unauthorized`) counted against it.
    pub async fn guard<T>(
        &self,
        addr: Option<IpAddr>,
        auth: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        self.check(addr)?;
        let result = auth.await;
        if let (
            Some(addr),
            Err(ApiError::InvalidKey | ApiError::InvalidToken(_) | ApiError::Unauthorized),
        ) = (addr, &result)
        {
            self.failed(addr);
        }
        result
    }

    /// `AuthThrottled` while `addr` has no allowance left.
    pub fn check(&self, addr: Option<IpAddr>) -> Result<(), ApiError> {
        let Some(key) = addr.map(bucket) else {
            return Ok(());
        };
        let Some(until) = self.blocked.get(&key).map(|u| *u) else {
            return Ok(());
        };
        let now = Instant::now();
        if until <= now {
            self.blocked.remove(&key);
            return Ok(());
        }
        Err(ApiError::AuthThrottled {
            retry_after_secs: (until - now).as_secs_f64().ceil() as u64,
        })
    }

    /// Counts a failure; the one that spends the allowance blocks the address until the next
    /// failure is forgiven.
    fn failed(&self, addr: IpAddr) {
        let key = bucket(addr);
        let blocked_for = match self.limiter.check_key(&key) {
            Ok(state) if state.remaining_burst_capacity() > 0 => None,
            Ok(_) => Some(self.refill),
            Err(not_until) => Some(not_until.wait_time_from(DefaultClock::default().now())),
        };
        if let Some(wait) = blocked_for {
            let now = Instant::now();
            let before = self
                .blocked
                .insert(key, now + wait.max(Duration::from_secs(1)));
            // Once per block, not once per attempt that was already on its way.
            if before.is_none_or(|until| until <= now) {
                tracing::warn!(address = %key, "failed authentications throttled");
            }
        }
        if self.limiter.len() > MAX_TRACKED {
            self.limiter.retain_recent();
            let now = Instant::now();
            self.blocked.retain(|_, until| *until > now);
        }
    }

    fn is_trusted(&self, addr: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&addr))
    }
}

fn parse_proxies(list: &str) -> Result<Vec<IpNet>, BadProxy> {
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<IpNet>()
                .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| BadProxy(p.to_owned()))
        })
        .collect()
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they are.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The unit an allowance belongs to: the address, or an IPv6 address's /64.
fn bucket(addr: IpAddr) -> IpAddr {
    match canonical(addr) {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn throttle(proxies: &str) -> AuthThrottle {
        AuthThrottle::new(&AuthConfig {
            trusted_proxies: proxies.into(),
            failure_burst: 2,
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn addr(peer: &str, xff: &[&str]) -> Option<IpAddr> {
        let mut headers = HeaderMap::new();
        for v in xff {
            headers.append(
                actix_web::http::header::HeaderName::from_static("x-forwarded-for"),
                v.parse().unwrap(),
            );
        }
        throttle("10.0.0.0/8, 127.0.0.1").client_addr(Some(peer.parse().unwrap()), &headers)
    }

    #[test]
    fn forwarded_for_is_believed_from_trusted_proxies_only() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(addr("203.0.113.9:1", &["198.51.100.1"]), ip("203.0.113.9"));
        assert_eq!(addr("127.0.0.1:1", &["198.51.100.1"]), ip("198.51.100.1"));
        assert_eq!(
            addr("10.1.2.3:1", &["6.6.6.6, 198.51.100.1, 10.0.0.7"]),
            ip("198.51.100.1")
        );
        assert_eq!(addr("10.1.2.3:1", &["6.6.6.6", "10.9.9.9"]), ip("6.6.6.6"));
        assert_eq!(addr("10.1.2.3:1", &["10.9.9.9"]), ip("10.9.9.9"));
        assert_eq!(addr("10.1.2.3:1", &["garbage"]), ip("10.1.2.3"));
        assert_eq!(addr("[::ffff:127.0.0.1]:1", &["1.2.3.4"]), ip("1.2.3.4"));
        assert!(
            AuthThrottle::new(&AuthConfig {
                trusted_proxies: "10.0.0.0/8,nope".into(),
                ..AuthConfig::default()
            })
            .is_err()
        );
    }

    #[tokio::test]
    async fn an_address_out_of_allowance_is_refused_before_the_lookup() {
        let t = throttle("");
        let a = Some("192.0.2.1".parse().unwrap());
        let other = Some("192.0.2.2".parse().unwrap());
        for _ in 0..2 {
            let r: Result<(), _> = t.guard(a, async { Err(ApiError::InvalidKey) }).await;
            assert!(matches!(r, Err(ApiError::InvalidKey)));
        }
        let looked_up = std::cell::Cell::new(false);
        let r = t
            .guard(a, async {
                looked_up.set(true);
                Ok(())
            })
            .await;
        assert!(matches!(r, Err(ApiError::AuthThrottled { .. })));
        assert!(!looked_up.get());
        assert!(t.guard(other, async { Ok(()) }).await.is_ok());
        let v6 = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        for _ in 0..2 {
            let _ = t
                .guard(v6("2001:db8::1"), async {
                    Err::<(), _>(ApiError::Unauthorized)
                })
                .await;
        }
        assert!(t.check(v6("2001:db8::ffff")).is_err());
        assert!(t.check(v6("2001:db8:0:1::1")).is_ok());
    }
}
