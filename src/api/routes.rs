//! The one route table: every path the API answers, its methods, the scope it needs, its
//! metrics label and its OpenAPI template; and `dispatch`, which checks the method and the
//! caller's scope once and calls the handler of the route's resource module.

use hyper::{Method, StatusCode};

use super::error::ApiError;
use super::{ApiState, Resp, json};
use crate::config::Scope;

/// The routes the API knows, with path parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    /// `GET /livez`: `/healthz` under the name orchestrators expect.
    Livez,
    Readyz,
    Metrics,
    OpenApi,
    Events,
    EventsBatch,
    Event(&'a str),
    EventDeliveries(&'a str),
    /// `GET /v1/events/{id}/attempts`: every attempt of every delivery, newest first.
    EventAttempts(&'a str),
    /// `POST /v1/events/{id}/cancel`: cancels its deliveries not yet terminal.
    EventCancel(&'a str),
    /// `GET /v1/batches/{id}`: a batch's delivery counts.
    Batch(&'a str),
    Deliveries,
    Delivery(&'a str),
    DeliveryAttempts(&'a str),
    DeliveryRetry(&'a str),
    DeliveryCancel(&'a str),
    Replay,
    DeadLetters,
    DeadLettersRedrive,
    Subscriptions,
    Subscription(&'a str),
    SubscriptionPause(&'a str),
    SubscriptionResume(&'a str),
    SubscriptionRotate(&'a str),
    /// `POST /v1/ingest/{source}`: an inbound provider webhook.
    Ingest(&'a str),
    Receipt(&'a str),
    AdminReload,
    /// `GET /v1/admin/backup`: a consistent copy of the database.
    AdminBackup,
}

impl<'a> Route<'a> {
    /// Matches a request path (one trailing `/` allowed).
    pub fn parse(path: &'a str) -> Option<Self> {
        let path = path.strip_suffix('/').unwrap_or(path);
        let segs: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        let r = match segs.as_slice() {
            ["healthz"] => Route::Healthz,
            ["livez"] => Route::Livez,
            ["readyz"] => Route::Readyz,
            ["metrics"] => Route::Metrics,
            ["v1", "openapi.json"] => Route::OpenApi,
            ["v1", "events"] => Route::Events,
            ["v1", "events", "batch"] => Route::EventsBatch,
            ["v1", "events", id] if !id.is_empty() => Route::Event(id),
            ["v1", "events", id, "deliveries"] if !id.is_empty() => Route::EventDeliveries(id),
            ["v1", "events", id, "attempts"] if !id.is_empty() => Route::EventAttempts(id),
            ["v1", "events", id, "cancel"] if !id.is_empty() => Route::EventCancel(id),
            ["v1", "batches", id] if !id.is_empty() => Route::Batch(id),
            ["v1", "deliveries"] => Route::Deliveries,
            ["v1", "deliveries", id] if !id.is_empty() => Route::Delivery(id),
            ["v1", "deliveries", id, "attempts"] if !id.is_empty() => Route::DeliveryAttempts(id),
            ["v1", "deliveries", id, "retry"] if !id.is_empty() => Route::DeliveryRetry(id),
            ["v1", "deliveries", id, "cancel"] if !id.is_empty() => Route::DeliveryCancel(id),
            ["v1", "replay"] => Route::Replay,
            ["v1", "dead-letters"] => Route::DeadLetters,
            ["v1", "dead-letters", "redrive"] => Route::DeadLettersRedrive,
            ["v1", "subscriptions"] => Route::Subscriptions,
            ["v1", "subscriptions", id] if !id.is_empty() => Route::Subscription(id),
            ["v1", "subscriptions", id, "pause"] if !id.is_empty() => Route::SubscriptionPause(id),
            ["v1", "subscriptions", id, "resume"] if !id.is_empty() => {
                Route::SubscriptionResume(id)
            }
            ["v1", "subscriptions", id, "rotate"] if !id.is_empty() => {
                Route::SubscriptionRotate(id)
            }
            ["v1", "ingest", source] if !source.is_empty() => Route::Ingest(source),
            ["v1", "receipts", id] if !id.is_empty() => Route::Receipt(id),
            ["v1", "admin", "reload"] => Route::AdminReload,
            ["v1", "admin", "backup"] => Route::AdminBackup,
            _ => return None,
        };
        Some(r)
    }

    /// The label used in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Livez => "livez",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::OpenApi => "openapi",
            Route::Events => "events",
            Route::EventsBatch => "events_batch",
            Route::Event(_) => "event",
            Route::EventDeliveries(_) => "event_deliveries",
            Route::EventAttempts(_) => "event_attempts",
            Route::EventCancel(_) => "event_cancel",
            Route::Batch(_) => "batch",
            Route::Deliveries => "deliveries",
            Route::Delivery(_) => "delivery",
            Route::DeliveryAttempts(_) => "delivery_attempts",
            Route::DeliveryRetry(_) => "delivery_retry",
            Route::DeliveryCancel(_) => "delivery_cancel",
            Route::Replay => "replay",
            Route::DeadLetters => "dead_letters",
            Route::DeadLettersRedrive => "dead_letters_redrive",
            Route::Subscriptions => "subscriptions",
            Route::Subscription(_) => "subscription",
            Route::SubscriptionPause(_) => "subscription_pause",
            Route::SubscriptionResume(_) => "subscription_resume",
            Route::SubscriptionRotate(_) => "subscription_rotate",
            Route::Ingest(_) => "ingest",
            Route::Receipt(_) => "receipt",
            Route::AdminReload => "admin_reload",
            Route::AdminBackup => "admin_backup",
        }
    }

    /// The methods this route answers.
    pub fn methods(self) -> &'static [Method] {
        match self {
            Route::Events | Route::Subscriptions => &[Method::GET, Method::POST],
            Route::Subscription(_) => &[Method::GET, Method::PUT, Method::DELETE],
            Route::EventsBatch
            | Route::EventCancel(_)
            | Route::DeliveryRetry(_)
            | Route::DeliveryCancel(_)
            | Route::Replay
            | Route::DeadLettersRedrive
            | Route::SubscriptionPause(_)
            | Route::SubscriptionResume(_)
            | Route::SubscriptionRotate(_)
            | Route::Ingest(_)
            | Route::AdminReload => &[Method::POST],
            _ => &[Method::GET],
        }
    }

    /// The scope a caller needs, `None` for open routes. Health, metrics and the document are
    /// open; an inbound webhook is verified by its source's signature instead. Producers
    /// (`publish`) publish, follow their batches and cancel their events; everything else is
    /// `admin` (which includes `publish`).
    pub fn scope(self, method: &Method) -> Option<Scope> {
        match self {
            Route::Healthz
            | Route::Livez
            | Route::Readyz
            | Route::Metrics
            | Route::OpenApi
            | Route::Ingest(_) => None,
            Route::Events if method == Method::POST => Some(Scope::Publish),
            Route::EventsBatch | Route::EventCancel(_) | Route::Batch(_) => Some(Scope::Publish),
            _ => Some(Scope::Admin),
        }
    }
}

impl Route<'static> {
    /// One instance of every route, for `table` (the OpenAPI test compares it with the
    /// document; a test numbers every variant, so a new one must be listed here).
    pub const ALL: &'static [Route<'static>] = &[
        Route::Healthz,
        Route::Livez,
        Route::Readyz,
        Route::Metrics,
        Route::OpenApi,
        Route::Events,
        Route::EventsBatch,
        Route::Event("e"),
        Route::EventDeliveries("e"),
        Route::EventAttempts("e"),
        Route::EventCancel("e"),
        Route::Batch("b"),
        Route::Deliveries,
        Route::Delivery("1"),
        Route::DeliveryAttempts("1"),
        Route::DeliveryRetry("1"),
        Route::DeliveryCancel("1"),
        Route::Replay,
        Route::DeadLetters,
        Route::DeadLettersRedrive,
        Route::Subscriptions,
        Route::Subscription("s"),
        Route::SubscriptionPause("s"),
        Route::SubscriptionResume("s"),
        Route::SubscriptionRotate("s"),
        Route::Ingest("s"),
        Route::Receipt("1"),
        Route::AdminReload,
        Route::AdminBackup,
    ];
}

impl Route<'_> {
    /// The path template as the OpenAPI document writes it.
    pub fn template(self) -> &'static str {
        match self {
            Route::Healthz => "/healthz",
            Route::Livez => "/livez",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/v1/openapi.json",
            Route::Events => "/v1/events",
            Route::EventsBatch => "/v1/events/batch",
            Route::Event(_) => "/v1/events/{id}",
            Route::EventDeliveries(_) => "/v1/events/{id}/deliveries",
            Route::EventAttempts(_) => "/v1/events/{id}/attempts",
            Route::EventCancel(_) => "/v1/events/{id}/cancel",
            Route::Batch(_) => "/v1/batches/{id}",
            Route::Deliveries => "/v1/deliveries",
            Route::Delivery(_) => "/v1/deliveries/{id}",
            Route::DeliveryAttempts(_) => "/v1/deliveries/{id}/attempts",
            Route::DeliveryRetry(_) => "/v1/deliveries/{id}/retry",
            Route::DeliveryCancel(_) => "/v1/deliveries/{id}/cancel",
            Route::Replay => "/v1/replay",
            Route::DeadLetters => "/v1/dead-letters",
            Route::DeadLettersRedrive => "/v1/dead-letters/redrive",
            Route::Subscriptions => "/v1/subscriptions",
            Route::Subscription(_) => "/v1/subscriptions/{id}",
            Route::SubscriptionPause(_) => "/v1/subscriptions/{id}/pause",
            Route::SubscriptionResume(_) => "/v1/subscriptions/{id}/resume",
            Route::SubscriptionRotate(_) => "/v1/subscriptions/{id}/rotate",
            Route::Ingest(_) => "/v1/ingest/{source}",
            Route::Receipt(_) => "/v1/receipts/{id}",
            Route::AdminReload => "/v1/admin/reload",
            Route::AdminBackup => "/v1/admin/backup",
        }
    }
}

/// Every (method, path template) the API answers.
pub fn table() -> Vec<(Method, &'static str)> {
    Route::ALL
        .iter()
        .flat_map(|r| r.methods().iter().map(move |m| (m.clone(), r.template())))
        .collect()
}

/// The route label `dispatch` gives a request for `path` (for a handler that never returned).
pub fn label(path: &str) -> &'static str {
    Route::parse(path).map_or("unknown", Route::name)
}

/// Routes a request: the method, then the caller's scope, then the handler. Returns the
/// route label for metrics with the outcome.
pub async fn dispatch(st: &ApiState, req: super::Req) -> (&'static str, Result<Resp, ApiError>) {
    let path = req.uri().path().to_owned();
    let Some(route) = Route::parse(&path) else {
        return (
            "unknown",
            Err(ApiError::not_found(format!("no route for {path}"))),
        );
    };
    let method = req.method().clone();
    if !route.methods().contains(&method) {
        let resp = super::method_not_allowed(&method, &path, route.methods());
        return (route.name(), Ok(resp));
    }
    if let Some(scope) = route.scope(&method)
        && let Err(e) = st.authorize(&req, scope)
    {
        return (route.name(), Err(e));
    }
    use super::{admin, backup, deliveries, events, health, inbound, recovery, subscriptions};
    let result = match (route, method) {
        (Route::Healthz | Route::Livez, _) => Ok(health::alive()),
        (Route::Readyz, _) => Ok(health::readyz(st).await),
        (Route::Metrics, _) => Ok(health::metrics(st)),
        (Route::OpenApi, _) => Ok(json(StatusCode::OK, admin::OPENAPI.as_bytes().to_vec())),
        (Route::Events, Method::POST) => events::publish(st, req).await,
        (Route::Events, _) => events::list(st, &req),
        (Route::EventsBatch, _) => events::publish_batch(st, req).await,
        (Route::Event(id), _) => events::get(st, id),
        (Route::EventDeliveries(id), _) => events::deliveries(st, &req, id),
        (Route::EventAttempts(id), _) => events::attempts(st, &req, id),
        (Route::EventCancel(id), _) => events::cancel(st, id).await,
        (Route::Batch(id), _) => events::batch(st, id),
        (Route::Deliveries, _) => deliveries::list(st, &req),
        (Route::Delivery(id), _) => deliveries::get(st, id),
        (Route::DeliveryAttempts(id), _) => deliveries::attempts(st, &req, id),
        (Route::DeliveryRetry(id), _) => deliveries::retry(st, id).await,
        (Route::DeliveryCancel(id), _) => deliveries::cancel(st, id).await,
        (Route::Replay, _) => recovery::replay(st, req).await,
        (Route::DeadLetters, _) => recovery::dead_letters(st, &req),
        (Route::DeadLettersRedrive, _) => recovery::redrive(st, req).await,
        (Route::Subscriptions, Method::POST) => subscriptions::create(st, req).await,
        (Route::Subscriptions, _) => subscriptions::list(st),
        (Route::Subscription(id), Method::PUT) => subscriptions::update(st, req, id).await,
        (Route::Subscription(id), Method::DELETE) => subscriptions::delete(st, id).await,
        (Route::Subscription(id), _) => subscriptions::get(st, id),
        (Route::SubscriptionPause(id), _) => subscriptions::pause(st, id, true).await,
        (Route::SubscriptionResume(id), _) => subscriptions::pause(st, id, false).await,
        (Route::SubscriptionRotate(id), _) => subscriptions::rotate(st, req, id).await,
        (Route::Ingest(source), _) => inbound::ingest(st, req, source).await,
        (Route::Receipt(id), _) => inbound::get_receipt(st, id),
        (Route::AdminReload, _) => admin::reload(st).await,
        (Route::AdminBackup, _) => backup::backup(st).await,
    };
    (route.name(), result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbers every variant. The match has no wildcard: a new route does not compile here
    /// until it is numbered, and the test below then wants it in `Route::ALL`.
    fn ordinal(r: Route<'_>) -> usize {
        match r {
            Route::Healthz => 0,
            Route::Livez => 1,
            Route::Readyz => 2,
            Route::Metrics => 3,
            Route::OpenApi => 4,
            Route::Events => 5,
            Route::EventsBatch => 6,
            Route::Event(_) => 7,
            Route::EventDeliveries(_) => 8,
            Route::EventAttempts(_) => 9,
            Route::EventCancel(_) => 10,
            Route::Batch(_) => 11,
            Route::Deliveries => 12,
            Route::Delivery(_) => 13,
            Route::DeliveryAttempts(_) => 14,
            Route::DeliveryRetry(_) => 15,
            Route::DeliveryCancel(_) => 16,
            Route::Replay => 17,
            Route::DeadLetters => 18,
            Route::DeadLettersRedrive => 19,
            Route::Subscriptions => 20,
            Route::Subscription(_) => 21,
            Route::SubscriptionPause(_) => 22,
            Route::SubscriptionResume(_) => 23,
            Route::SubscriptionRotate(_) => 24,
            Route::Ingest(_) => 25,
            Route::Receipt(_) => 26,
            Route::AdminReload => 27,
            Route::AdminBackup => 28,
        }
    }
    const VARIANTS: usize = 29;

    #[test]
    fn the_route_list_holds_every_variant_and_each_parses_back_from_its_template() {
        let mut all: Vec<usize> = Route::ALL.iter().map(|r| ordinal(*r)).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all, (0..VARIANTS).collect::<Vec<_>>(), "Route::ALL");
        for r in Route::ALL {
            let id = match r {
                Route::Event(_)
                | Route::EventDeliveries(_)
                | Route::EventAttempts(_)
                | Route::EventCancel(_) => "e",
                Route::Batch(_) => "b",
                Route::Subscription(_)
                | Route::SubscriptionPause(_)
                | Route::SubscriptionResume(_)
                | Route::SubscriptionRotate(_) => "s",
                _ => "1",
            };
            let concrete = r.template().replace("{id}", id).replace("{source}", "s");
            assert_eq!(Route::parse(&concrete), Some(*r), "{concrete}");
        }
    }

    #[test]
    fn paths_and_their_routes() {
        assert_eq!(Route::parse("/v1/events/"), Some(Route::Events));
        assert_eq!(Route::parse("/v1/events/batch"), Some(Route::EventsBatch));
        assert_eq!(
            Route::parse("/v1/subscriptions/crm/"),
            Some(Route::Subscription("crm"))
        );
        assert_eq!(Route::parse("/v1/events/e1/x"), None);
        assert_eq!(Route::parse("/v1/deliveries/7/x"), None);
        assert_eq!(Route::parse("/v1/subscriptions//pause"), None);
        assert_eq!(Route::parse("/v1/replay/x"), None);
        assert_eq!(Route::parse("/v1/ingest/"), None);
        assert_eq!(Route::parse("/v1/ingest/a/b"), None);
        assert_eq!(Route::parse("/v1/nope"), None);
        assert_eq!(Route::parse(""), None);
        assert_eq!(Route::Ingest("x").methods(), &[Method::POST]);
        assert_eq!(Route::Receipt("7").methods(), &[Method::GET]);
    }

    #[test]
    fn scopes() {
        use Scope::{Admin, Publish};
        let cases = [
            (Route::Healthz, Method::GET, None),
            (Route::OpenApi, Method::GET, None),
            (Route::Ingest("s"), Method::POST, None),
            (Route::Events, Method::POST, Some(Publish)),
            (Route::Events, Method::GET, Some(Admin)),
            (Route::EventsBatch, Method::POST, Some(Publish)),
            (Route::Batch("b"), Method::GET, Some(Publish)),
            (Route::EventCancel("e"), Method::POST, Some(Publish)),
            (Route::Event("e"), Method::GET, Some(Admin)),
            (Route::Receipt("1"), Method::GET, Some(Admin)),
            (Route::AdminBackup, Method::GET, Some(Admin)),
            (Route::Subscriptions, Method::POST, Some(Admin)),
        ];
        for (r, m, want) in cases {
            assert_eq!(r.scope(&m), want, "{r:?} {m}");
        }
    }
}
