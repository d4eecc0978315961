//! `sift review`: the analysts' web UI. A reviewer sees a document's text
//! and the model's top 5, and accepts one of them, chooses another label,
//! or rejects all five; each decision goes to family `r` of `documents` and
//! to `sift.feedback`, and the next training run learns from it.
//!
//! - `mod.rs`: the CLI (`sift review`, `sift review user …`), the server
//!   (routes, the session extractor, timings and security headers, TLS,
//!   graceful shutdown) and the read-only pages.
//! - `auth.rs`: users, sessions, CSRF tokens, the login limit.
//! - `queue.rs`: the in-memory queue rebuilt from the table, leases, labels.
//! - `decide.rs`: decisions and skips. `stats.rs`: `/stats`.
//! - `pages.rs`: the HTML (maud, escaped). `assets.rs`: the script and styles.
//!
//! Leases and sessions live in the server's memory: run one review server
//! per `documents` table. `/metrics` and `/healthz` are routes of the same
//! server.

pub mod assets;
pub mod auth;
pub mod charts;
pub mod client;
pub mod decide;
pub mod identity;
pub mod pages;
pub mod queue;
pub mod stats;

use std::future::Future;
use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, Form, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::backends::log::Log;
use crate::backends::objects::ObjectStore;
use crate::backends::table::Table;
use crate::config::Config;
use crate::documents::{self, categories, CATEGORIES, META, REVIEW};
use crate::envelope::topics;

use auth::{Auth, LoginError, Role, Session};
use pages::{DocView, QueueView, ShownReview};
use queue::{Filters, LabelSource, Labels, Leases, Queue};

/// How many documents the queue page lists.
const QUEUE_ROWS: usize = 200;
/// How many labels `/labels` returns.
const LABEL_RESULTS: usize = 20;
/// How long in-flight requests get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(10);
/// Env variable `sift review user add|passwd` read the password from.
pub const PASSWORD_ENV: &str = "SIFT_REVIEW_PASSWORD";

/// `sift review`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ReviewArgs {
    /// Address to listen on (default `review.listen`).
    #[arg(long, env = "SIFT_REVIEW_LISTEN")]
    pub listen: Option<String>,
    /// Manage users instead of serving.
    #[command(subcommand)]
    pub command: Option<ReviewCommand>,
}

/// `sift review …` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReviewCommand {
    /// Add, remove and list the review UI's users.
    #[command(subcommand)]
    User(UserCommand),
}

/// `sift review user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user. The password comes from --password-stdin, else
    /// SIFT_REVIEW_PASSWORD, else a prompt on the terminal.
    Add {
        /// User name (1-64 of a-z A-Z 0-9 . _ - @).
        name: String,
        /// What the user may do.
        #[arg(long, value_enum, default_value_t = Role::Reviewer)]
        role: Role,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove a user; their open sessions close within 30 seconds.
    Remove {
        /// User name.
        name: String,
    },
    /// Set a user's password; their open sessions close within 30 seconds.
    Passwd {
        /// User name.
        name: String,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users and their roles.
    List,
}

/// Runs `sift review`.
pub async fn main(config: &Config, args: ReviewArgs) -> crate::Result<()> {
    if let Some(ReviewCommand::User(command)) = args.command {
        return user(config, command).await;
    }
    let backends = Backends::open(config).await?;
    let listen = args.listen.unwrap_or_else(|| config.review.listen.clone());
    let server = Server::start(config, backends, &listen).await?;
    println!("review UI at {}", server.url());
    server.run_until(crate::daemon::shutdown_signal()).await
}

fn password(name: &str, from_stdin: bool) -> crate::Result<String> {
    let io = |e| crate::Error::io("reading the password", e);
    let password = if from_stdin {
        let mut line = String::new();
        std::io::stdin().read_to_string(&mut line).map_err(io)?;
        line.lines().next().unwrap_or_default().to_owned()
    } else if let Ok(p) = std::env::var(PASSWORD_ENV) {
        p
    } else if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("Password for {name}: ")).map_err(io)?;
        let again = rpassword::prompt_password("Again: ").map_err(io)?;
        if first != again {
            return Err(crate::Error::Invalid(
                "the two passwords differ; run the command again".into(),
            ));
        }
        first
    } else {
        return Err(crate::Error::Invalid(format!(
            "no password given: pass --password-stdin and pipe it, set {PASSWORD_ENV}, or run the command in a terminal"
        )));
    };
    Ok(password)
}

async fn user(config: &Config, command: UserCommand) -> crate::Result<()> {
    let table = crate::backends::open_table(config).await?;
    match command {
        UserCommand::Add {
            name,
            role,
            password_stdin,
        } => {
            let pw = password(&name, password_stdin)?;
            auth::add_user(table.as_ref(), &name, &pw, role).await?;
            println!("added review user {name} ({role})");
        }
        UserCommand::Remove { name } => {
            if auth::remove_user(table.as_ref(), &name).await? {
                println!("removed review user {name}");
            } else {
                return Err(crate::Error::Invalid(format!(
                    "there is no review user `{name}` (see `sift review user list`)"
                )));
            }
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            let pw = password(&name, password_stdin)?;
            auth::set_password(table.as_ref(), &name, &pw).await?;
            println!("changed the password of review user {name}");
        }
        UserCommand::List => {
            let users = auth::list_users(table.as_ref()).await?;
            for (name, role) in &users {
                println!("{name}\t{role}");
            }
            eprintln!("({} users)", users.len());
        }
    }
    Ok(())
}

/// The stores the review server uses.
#[derive(Clone)]
pub struct Backends {
    /// `documents` and `review_users`.
    pub table: Arc<dyn Table>,
    /// `sift.feedback`.
    pub log: Arc<dyn Log>,
    /// The model registry, for its labels; None = labels from the table.
    pub objects: Option<Arc<dyn ObjectStore>>,
    /// The matcher's cache (handle → person), which identity decisions
    /// update; None = a cache of the server's own.
    pub cache: Option<Arc<dyn crate::backends::Cache>>,
}

impl Backends {
    /// The configured backends.
    pub async fn open(config: &Config) -> crate::Result<Self> {
        Ok(Backends {
            table: crate::backends::open_table(config).await?,
            log: crate::backends::open_log(config).await?,
            objects: Some(crate::backends::open_objects(config).await?),
            cache: Some(crate::backends::open_cache(config).await?),
        })
    }
}

/// What every handler shares.
pub(crate) struct App {
    table: Arc<dyn Table>,
    log: Arc<dyn Log>,
    auth: Auth,
    queue: Queue,
    leases: Leases,
    labels: Labels,
    identities: identity::IdentityQueue,
    cache: Arc<dyn crate::backends::Cache>,
}

pub(crate) type AppState = Arc<App>;

/// A request from a logged-in reviewer; without a valid session the
/// request is answered with a redirect to the login page.
pub(crate) struct Reviewer(pub Session);

impl FromRequestParts<AppState> for Reviewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Response> {
        match app.auth.session(&parts.headers) {
            Some(s) => Ok(Reviewer(s)),
            None => Err(to_login(parts)),
        }
    }
}

fn to_login(parts: &Parts) -> Response {
    let original = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let next: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("next", &original)
        .finish();
    Redirect::to(&format!("/login?{next}")).into_response()
}

/// A running review server.
pub struct Server {
    addr: SocketAddr,
    tls: bool,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Builds the queue, binds `listen` and serves in the background.
    pub async fn start(config: &Config, backends: Backends, listen: &str) -> crate::Result<Self> {
        let review = &config.review;
        let tls = !review.tls_cert.is_empty() && !review.tls_key.is_empty();
        let Backends {
            table,
            log,
            objects,
            cache,
        } = backends;
        table
            .ensure_table(documents::TABLE, &crate::documents::FAMILIES)
            .await?;
        log.create_topic(topics::FEEDBACK, config.log.default_partitions)
            .await?;
        crate::matching::sink::ensure_tables(table.as_ref()).await?;
        log.create_topic(topics::MATCHES, config.log.default_partitions)
            .await?;
        let cache = match cache {
            Some(cache) => cache,
            None => crate::backends::open_cache(config).await?,
        };
        let identities = identity::IdentityQueue::default();
        identities.replace(identity::IdentityQueue::build(table.as_ref()).await?);
        let auth = Auth::new(table.clone(), review, tls).await?;
        let started = Instant::now();
        let snapshot = queue::build(table.as_ref(), None).await?;
        let seconds = started.elapsed().as_secs_f64();
        crate::metrics::global()
            .review_queue_refresh_seconds
            .observe(seconds);
        tracing::info!(
            documents = snapshot.docs().len(),
            seconds,
            "Built the review queue."
        );
        let label_source = if !review.labels.is_empty() {
            Some(LabelSource::File(review.labels.clone().into()))
        } else {
            objects.map(|store| LabelSource::Registry {
                store,
                prefix: config.train.prefix.clone(),
            })
        };
        let labels = Labels::load(label_source.as_ref(), &snapshot).await?;
        let app = Arc::new(App {
            table,
            log,
            auth,
            queue: Queue::new(snapshot),
            leases: Leases::new(review.lease),
            labels,
            identities,
            cache,
        });
        let refresher = tokio::spawn(refresh_loop(
            Arc::downgrade(&app),
            review.queue_refresh,
            label_source,
        ));
        let router = router(app);
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            crate::Error::io(
                format!("listening on {listen} (review.listen or --listen)"),
                e,
            )
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| crate::Error::io("reading the bound address", e))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        let served = if tls {
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(
                &review.tls_cert,
                &review.tls_key,
            )
            .await
            .map_err(|e| {
                crate::Error::io(
                    format!(
                        "loading the TLS certificate {} and key {} (review.tls_cert, review.tls_key; PEM files)",
                        review.tls_cert, review.tls_key
                    ),
                    e,
                )
            })?;
            let std_listener = listener
                .into_std()
                .map_err(|e| crate::Error::io("preparing the listener for TLS", e))?;
            let handle = axum_server::Handle::new();
            let server = axum_server::from_tcp_rustls(std_listener, config)
                .map_err(|e| crate::Error::io("preparing the listener for TLS", e))?
                .handle(handle.clone());
            tokio::spawn(async move {
                let _ = stopped.await;
                handle.graceful_shutdown(Some(DRAIN));
            });
            tokio::spawn(server.serve(service))
        } else {
            tokio::spawn(async move {
                axum::serve(listener, service)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await
            })
        };
        tracing::info!(%addr, tls, "Serving the review UI.");
        Ok(Server {
            addr,
            tls,
            stop,
            served,
            refresher,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/` or `https://ADDR/`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}/",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Serves until `signal` resolves, then lets in-flight requests finish.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> crate::Result<()> {
        let Server {
            stop,
            mut served,
            refresher,
            ..
        } = self;
        let result = tokio::select! {
            _ = signal => {
                let _ = stop.send(());
                (&mut served).await
            }
            result = &mut served => result,
        };
        refresher.abort();
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(crate::Error::io("serving the review UI", e)),
            Err(e) => Err(crate::Error::Invalid(format!(
                "the review server failed: {e}"
            ))),
        }
    }

    /// Stops accepting connections and waits for in-flight requests.
    pub async fn shutdown(self) -> crate::Result<()> {
        self.run_until(std::future::ready(())).await
    }
}

/// Rebuilds the queue every `every` until the server is gone.
async fn refresh_loop(app: std::sync::Weak<App>, every: Duration, labels: Option<LabelSource>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        let started = Instant::now();
        let previous = app.queue.snapshot();
        match queue::build(app.table.as_ref(), Some(&previous)).await {
            Ok(snapshot) => {
                if let Some(source) = &labels {
                    app.labels.refresh(source).await;
                }
                app.labels.merge(&snapshot);
                app.queue.replace(snapshot);
                let seconds = started.elapsed().as_secs_f64();
                crate::metrics::global()
                    .review_queue_refresh_seconds
                    .observe(seconds);
                tracing::debug!(seconds, "Rebuilt the review queue.");
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot rebuild the review queue; keeping the last one.")
            }
        }
        match identity::IdentityQueue::build(app.table.as_ref()).await {
            Ok(items) => app.identities.replace(items),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot rebuild the identity queue; keeping the last one.")
            }
        }
        app.leases.sweep();
    }
}

fn router(app: AppState) -> Router {
    Router::new()
        .route("/", get(to_queue))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout).get(to_queue))
        .route("/queue", get(queue_page))
        .route("/next", get(next))
        .route("/doc/{id}", get(doc_page))
        .route(
            "/doc/{id}/decide",
            post(decide::decide).get(decide::back_to_doc),
        )
        .route(
            "/doc/{id}/skip",
            post(decide::skip).get(decide::back_to_doc),
        )
        .route("/identities", get(identity::list))
        .route("/identities/next", get(identity::next))
        .route("/identity/{row}", get(identity::page))
        .route(
            "/identity/{row}/decide",
            post(identity::decide).get(identity::back),
        )
        .route(
            "/identity/{row}/skip",
            post(identity::skip).get(identity::back),
        )
        .route("/labels", get(labels))
        .route("/stats", get(stats_page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(assets::JS_PATH, get(assets::js))
        .route(assets::CSS_PATH, get(assets::css))
        // Browsers fetch it unasked; redirected to /login it would replace
        // the login form's CSRF cookie and fail the login in progress.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(timing))
        .with_state(app)
}

/// The page label of a request, for the timing histogram.
fn page_of(method: &Method, path: &str) -> &'static str {
    let post = method == Method::POST;
    match path {
        "/login" if post => "login_post",
        "/login" => "login",
        "/logout" => "logout",
        "/queue" => "queue",
        "/next" => "next",
        "/labels" => "labels",
        "/stats" => "stats",
        "/healthz" => "healthz",
        "/metrics" => "metrics",
        p if p.starts_with("/assets/") => "assets",
        p if p.starts_with("/doc/") && p.ends_with("/decide") => "decide",
        p if p.starts_with("/doc/") && p.ends_with("/skip") => "skip",
        p if p.starts_with("/doc/") => "doc",
        "/identities" => "identities",
        "/identities/next" => "identity_next",
        p if p.starts_with("/identity/") && p.ends_with("/decide") => "identity_decide",
        p if p.starts_with("/identity/") && p.ends_with("/skip") => "identity_skip",
        p if p.starts_with("/identity/") => "identity",
        _ => "other",
    }
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self'; connect-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// Times each request (histogram by page, `Server-Timing` header) and adds
/// the security headers.
async fn timing(request: Request, next: Next) -> Response {
    let page = page_of(request.method(), request.uri().path());
    let started = Instant::now();
    let mut response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    crate::metrics::global().review_page(page, seconds);
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("app;dur={:.3}", seconds * 1e3)) {
        h.insert("server-timing", v);
    }
    let html = h
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    if html {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn to_queue(Reviewer(_): Reviewer) -> Redirect {
    Redirect::to("/queue")
}

#[derive(Debug, Default, Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// Where a login may send the browser: a local path, never another site.
fn local_path(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.starts_with("/\\")
                && !n.starts_with("/login")
                && !n.chars().any(|c| c.is_control()) =>
        {
            n.to_owned()
        }
        _ => "/queue".to_owned(),
    }
}

/// The login form with a fresh CSRF token (and its cookie).
fn login_form(
    auth: &Auth,
    status: StatusCode,
    next: &str,
    user: &str,
    error: Option<&str>,
) -> Response {
    let (token, cookie) = auth.new_login_csrf();
    let mut response = (status, pages::login(&token, next, user, error)).into_response();
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

async fn login_page(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    let next = local_path(q.next.as_deref());
    // Keep the token of a login form already on screen (another tab, or a
    // request the browser made by itself) valid.
    let (token, cookie) = app.auth.login_csrf_for(&headers);
    let mut response = (StatusCode::OK, pages::login(&token, &next, "", None)).into_response();
    if let Some(cookie) = cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

#[derive(Debug, Default, Deserialize)]
struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
    next: Option<String>,
}

async fn login(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let form = form.map(|f| f.0).unwrap_or_default();
    let next = local_path(form.next.as_deref());
    let metrics = crate::metrics::global();
    if !app.auth.login_csrf_ok(&headers, &form.csrf) {
        metrics.review_login("forbidden");
        return login_form(
            &app.auth,
            StatusCode::FORBIDDEN,
            &next,
            &form.username,
            Some("The login form expired or was not sent by this site. Log in again."),
        );
    }
    match app
        .auth
        .login(&form.username, &form.password, peer.ip())
        .await
    {
        Ok(session) => {
            let mut response = Redirect::to(&next).into_response();
            response
                .headers_mut()
                .append(header::SET_COOKIE, app.auth.session_cookie(&session));
            response
        }
        Err(LoginError::Invalid) => login_form(
            &app.auth,
            StatusCode::UNAUTHORIZED,
            &next,
            &form.username,
            Some("Invalid user name or password"),
        ),
        Err(LoginError::RateLimited { retry_after }) => {
            let seconds = retry_after.as_secs().max(1);
            let message = format!("Too many failed logins. Wait {seconds} seconds and try again.");
            let mut response = login_form(
                &app.auth,
                StatusCode::TOO_MANY_REQUESTS,
                &next,
                &form.username,
                Some(&message),
            );
            if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            response
        }
        Err(LoginError::Backend(e)) => {
            tracing::warn!(error = %e, "Cannot check a review login.");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                pages::error(
                    None,
                    "Try again",
                    "The users table did not answer. Try again in a moment.",
                ),
            )
                .into_response()
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(app): State<AppState>,
    Reviewer(session): Reviewer,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let form = form.map(|f| f.0).unwrap_or_default();
    if !app.auth.csrf_ok(&session, &form.csrf) {
        return decide::forbidden(Some(&session));
    }
    app.auth.logout(&session.id);
    app.leases.forget(&session.id);
    let mut response = Redirect::to("/login").into_response();
    response
        .headers_mut()
        .append(header::SET_COOKIE, app.auth.clear_session_cookie());
    response
}

#[derive(Debug, Default, Deserialize)]
struct FilterQuery {
    source: Option<String>,
    category: Option<String>,
    order: Option<String>,
    empty: Option<String>,
}

impl FilterQuery {
    fn filters(&self) -> Filters {
        Filters::new(
            self.source.as_deref(),
            self.category.as_deref(),
            self.order.as_deref(),
        )
    }
}

async fn queue_page(
    State(app): State<AppState>,
    Reviewer(session): Reviewer,
    Query(q): Query<FilterQuery>,
) -> Response {
    let filters = q.filters();
    let (count, docs) = app.queue.waiting(&filters, QUEUE_ROWS);
    let snapshot = app.queue.snapshot();
    let labels = app.labels.all();
    let view = QueueView {
        filters: &filters,
        count,
        docs: &docs,
        sources: snapshot.sources(),
        labels: &labels,
        exhausted: q.empty.is_some(),
    };
    pages::queue(&session, &view).into_response()
}

async fn next(
    State(app): State<AppState>,
    Reviewer(session): Reviewer,
    Query(q): Query<FilterQuery>,
) -> Response {
    let filters = q.filters();
    let found = app.queue.next(&filters, |id| {
        !app.leases.skipped(&session.id, id) && app.leases.take(id, &session.user).is_ok()
    });
    match found {
        Some(id) => Redirect::to(&filters.url(&pages::doc_path(&id))).into_response(),
        None => {
            let mut url = filters.url("/queue");
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str("empty=1");
            Redirect::to(&url).into_response()
        }
    }
}

fn text_cell(row: &crate::backends::table::Row, family: &str, qualifier: &str) -> Option<String> {
    row.get(family, qualifier.as_bytes())
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[derive(Deserialize)]
struct Scored {
    label: String,
    score: f32,
}

async fn doc_page(
    State(app): State<AppState>,
    Reviewer(session): Reviewer,
    Path(id): Path<String>,
    Query(q): Query<FilterQuery>,
) -> Response {
    let filters = q.filters();
    if let Err(holder) = app.leases.take(&id, &session.user) {
        return (
            StatusCode::CONFLICT,
            pages::leased(&session, &id, &holder, &filters),
        )
            .into_response();
    }
    let row = match app.table.get(documents::TABLE, id.as_bytes(), None).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            app.leases.release(&id, &session.user);
            return (
                StatusCode::NOT_FOUND,
                pages::error(
                    Some(&session),
                    "No such document",
                    "There is no document with this id.",
                ),
            )
                .into_response();
        }
        Err(e) => {
            app.leases.release(&id, &session.user);
            tracing::warn!(error = %e, "Cannot read a document.");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                pages::error(
                    Some(&session),
                    "Try again",
                    "The documents table did not answer. Reload in a moment.",
                ),
            )
                .into_response();
        }
    };
    let top5: Vec<(String, f32)> = row
        .get(CATEGORIES, categories::TOP5.as_bytes())
        .and_then(|v| serde_json::from_slice::<Vec<Scored>>(v).ok())
        .unwrap_or_default()
        .into_iter()
        .take(5)
        .map(|s| (s.label, s.score))
        .collect();
    let why: Vec<Vec<String>> = row
        .get(CATEGORIES, categories::WHY.as_bytes())
        .and_then(|v| serde_json::from_slice(v).ok())
        .unwrap_or_default();
    let review = text_cell(&row, REVIEW, documents::review::DECISION).map(|decision| ShownReview {
        decision,
        label: text_cell(&row, REVIEW, documents::review::LABEL).unwrap_or_default(),
        reviewer: text_cell(&row, REVIEW, documents::review::REVIEWER).unwrap_or_default(),
    });
    let view = DocView {
        title: text_cell(&row, META, "title").unwrap_or_default(),
        source: text_cell(&row, META, "source").unwrap_or_default(),
        url: text_cell(&row, META, "url").unwrap_or_default(),
        content_type: text_cell(&row, META, "content_type").unwrap_or_default(),
        fetched_at_ms: text_cell(&row, META, "fetched_at_ms").and_then(|t| t.parse().ok()),
        text: text_cell(&row, META, "text"),
        model_version: text_cell(&row, CATEGORIES, categories::MODEL_VERSION).unwrap_or_default(),
        top5,
        why,
        review,
        id,
    };
    pages::doc(&session, &view, &filters).into_response()
}

#[derive(Debug, Default, Deserialize)]
struct LabelQuery {
    #[serde(default)]
    q: String,
    /// `1`: objects with each label's category name and description
    /// instead of bare labels.
    #[serde(default)]
    detail: u8,
}

/// One label found by the search, with what it means.
#[derive(Debug, Serialize)]
struct LabelDetail {
    label: String,
    name: String,
    description: String,
}

async fn labels(
    State(app): State<AppState>,
    Reviewer(_): Reviewer,
    Query(q): Query<LabelQuery>,
) -> Response {
    let found = app.labels.search(&q.q, LABEL_RESULTS);
    if q.detail == 0 {
        return Json(found).into_response();
    }
    let detailed: Vec<LabelDetail> = found
        .into_iter()
        .map(|label| {
            let c = crate::categories::get(&label);
            LabelDetail {
                name: c.map(|c| c.name.clone()).unwrap_or_default(),
                description: c.map(|c| c.description.clone()).unwrap_or_default(),
                label,
            }
        })
        .collect();
    Json(detailed).into_response()
}

async fn stats_page(State(app): State<AppState>, Reviewer(session): Reviewer) -> Response {
    let s = stats::compute(&app.queue);
    pages::stats(&session, &s).into_response()
}

async fn healthz(State(app): State<AppState>) -> Response {
    let families = [CATEGORIES.to_string()];
    let probe = app
        .table
        .get(documents::TABLE, b"~healthz", Some(&families));
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok\n").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n").into_response(),
    }
}

async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::global().render(),
    )
        .into_response()
}

async fn not_found(State(app): State<AppState>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    match app.auth.session(&parts.headers) {
        Some(s) => (
            StatusCode::NOT_FOUND,
            pages::error(Some(&s), "Not found", "There is no such page."),
        )
            .into_response(),
        None => to_login(&parts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_only_redirects_to_local_paths() {
        assert_eq!(
            local_path(Some("/doc/a?order=margin")),
            "/doc/a?order=margin"
        );
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil",
            "",
            "/login?next=/x",
            "/a\nb",
        ] {
            assert_eq!(local_path(Some(bad)), "/queue", "{bad}");
        }
        assert_eq!(local_path(None), "/queue");
    }

    #[test]
    fn pages_are_labelled_without_ids() {
        assert_eq!(page_of(&Method::GET, "/doc/abc"), "doc");
        assert_eq!(page_of(&Method::POST, "/doc/abc/decide"), "decide");
        assert_eq!(page_of(&Method::POST, "/login"), "login_post");
        assert_eq!(page_of(&Method::GET, "/nope"), "other");
    }
}
