//! Who may use `sift review`: users with argon2id password hashes in the table
//! `review_users`, server-side sessions, CSRF tokens and a limit on failed
//! logins.
//!
//! | family | qualifier | value |
//! | --- | --- | --- |
//! | `u` | `hash` | argon2id PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) |
//! | `u` | `role` | `reviewer` or `admin` |
//! | `u` | `created_at_ms` | when the user was added, ms since the epoch (decimal) |
//!
//! The row key is the user name.
//!
//! Sessions live in the review server's memory, since there is one review
//! server: a restart logs everyone out. A session lasts `review.session_ttl`
//! from login, the same lifetime as its cookie's `Max-Age`, and is not renewed
//! by use, so a stolen cookie stops working at the latest one TTL after the
//! login. The server checks the users of open sessions against the table every
//! 30 seconds and closes the sessions of users who were removed or whose
//! password changed. Session ids are kept only as BLAKE3 hashes, so a lookup
//! takes the same time whichever id it is given.
//!
//! The login form uses a signed double-submit cookie: its token is a random
//! nonce and a MAC of it under a key drawn when the server starts, so a cookie
//! planted by another site cannot carry a token this server would accept.
//!
//! Failed logins are limited per user name and per client address (an IPv6
//! client by its /64 prefix, since one host usually holds a whole /64) in a
//! sliding minute. An attempt takes its slot before the password is checked,
//! so concurrent guesses cannot overrun the limit. Behind a reverse proxy
//! every client has the proxy's address: the per-address limit then applies
//! to all users together.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::http::{header, HeaderMap, HeaderValue};
use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::backends::table::{Delete, RowPut, Scan, Table};
use crate::config::ReviewConfig;
use crate::Error;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "sift_session";
/// Name of the login form's double-submit CSRF cookie.
pub const LOGIN_CSRF_COOKIE: &str = "sift_login_csrf";
/// Table and family of the users.
pub const USERS_TABLE: &str = "review_users";
/// Family of the users' cells.
pub const USERS_FAMILY: &str = "u";

/// Qualifier of the password hash.
const Q_HASH: &str = "hash";
/// Qualifier of the role.
const Q_ROLE: &str = "role";
/// Qualifier of the creation time.
const Q_CREATED_AT_MS: &str = "created_at_ms";

/// Shortest password accepted, in characters.
const MIN_PASSWORD_CHARS: usize = 8;
/// Longest user name accepted, in characters.
const MAX_NAME_CHARS: usize = 64;
/// The rate limit's sliding window.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// How often expired sessions and old failures are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How often open sessions are checked against the users table.
const REVALIDATE_EVERY: Duration = Duration::from_secs(30);
/// Longest session accepted (browsers cap cookie lifetimes at 400 days).
const MAX_SESSION_TTL: Duration = Duration::from_secs(400 * 24 * 3600);
/// Random bytes in a session id and a session's CSRF token.
const TOKEN_BYTES: usize = 32;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reviews documents.
    Reviewer,
    /// Reviews documents; kept apart for administrative pages.
    Admin,
}

impl Role {
    /// The name stored in the table and shown on pages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reviewer => "reviewer",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "reviewer" => Ok(Role::Reviewer),
            "admin" => Ok(Role::Admin),
            other => Err(Error::Invalid(format!(
                "unknown review role `{other}`: use `reviewer` or `admin`"
            ))),
        }
    }
}

/// A logged-in user's session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Session id (the cookie's value).
    pub id: String,
    /// User name.
    pub user: String,
    /// The user's role at login (updated if it changes in the table).
    pub role: Role,
    /// The token every form of this session carries.
    pub csrf: String,
}

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Unknown user or wrong password (deliberately not told apart).
    #[error("Invalid user name or password")]
    Invalid,
    /// Too many failed attempts for this user name or client address.
    #[error("Too many failed logins: wait {} seconds and try again", .retry_after.as_secs())]
    RateLimited {
        /// How long until an attempt is allowed again (whole seconds, at least 1).
        retry_after: Duration,
    },
    /// The users table could not be read.
    #[error("the login could not be checked: {0}")]
    Backend(#[from] Error),
}

/// Users, sessions, CSRF tokens and the login limit of one review server.
/// Cheap to clone: every clone shares the same sessions.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    table: Arc<dyn Table>,
    ttl: Duration,
    secure: bool,
    max_failures: usize,
    window: Duration,
    /// A hash of a random password, verified against when the user does not
    /// exist so that unknown names cost as much as wrong passwords.
    dummy_phc: String,
    /// Key of the login form tokens' MAC.
    login_csrf_key: [u8; 32],
    sessions: Mutex<Sessions>,
    failures: Mutex<Failures>,
}

struct Sessions {
    /// BLAKE3 of the session id → the session.
    by_key: HashMap<[u8; 32], StoredSession>,
    last_sweep: Instant,
}

struct StoredSession {
    user: String,
    role: Role,
    csrf: String,
    expires: Instant,
    /// BLAKE3 of the password hash at login: a new password closes the session.
    credential: blake3::Hash,
}

struct Failures {
    by_user: HashMap<String, VecDeque<Instant>>,
    by_client: HashMap<IpAddr, VecDeque<Instant>>,
    last_sweep: Instant,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("session_ttl", &self.inner.ttl)
            .field("secure_cookies", &self.inner.secure)
            .field("login_attempts_per_minute", &self.inner.max_failures)
            .field("sessions", &self.inner.sessions.lock().by_key.len())
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Creates the users table if missing and starts an empty session store.
    /// `secure_cookies` adds `Secure` to every cookie (set it when serving
    /// over TLS). Must run inside a tokio runtime: it starts the task that
    /// checks open sessions against the users table.
    pub async fn new(
        table: Arc<dyn Table>,
        config: &ReviewConfig,
        secure_cookies: bool,
    ) -> crate::Result<Self> {
        Self::with_window(table, config, secure_cookies, RATE_WINDOW).await
    }

    /// [`Auth::new`] with another rate-limit window (tests shorten it).
    async fn with_window(
        table: Arc<dyn Table>,
        config: &ReviewConfig,
        secure_cookies: bool,
        window: Duration,
    ) -> crate::Result<Self> {
        if config.login_attempts_per_minute == 0 {
            return Err(Error::Invalid(
                "review.login_attempts_per_minute is 0, which would refuse every login: set it to at least 1".into(),
            ));
        }
        if config.session_ttl.is_zero() || config.session_ttl > MAX_SESSION_TTL {
            return Err(Error::Invalid(format!(
                "review.session_ttl is {}: set it between 1s and 400days (for example \"12h\")",
                humantime::format_duration(config.session_ttl)
            )));
        }
        table.ensure_table(USERS_TABLE, &[USERS_FAMILY]).await?;
        let dummy_phc = hash_blocking(random_hex(TOKEN_BYTES)).await?;
        let mut login_csrf_key = [0u8; 32];
        rand::rng().fill_bytes(&mut login_csrf_key);
        let now = Instant::now();
        let inner = Arc::new(Inner {
            table,
            ttl: config.session_ttl,
            secure: secure_cookies,
            max_failures: config.login_attempts_per_minute as usize,
            window,
            dummy_phc,
            login_csrf_key,
            sessions: Mutex::new(Sessions {
                by_key: HashMap::new(),
                last_sweep: now,
            }),
            failures: Mutex::new(Failures {
                by_user: HashMap::new(),
                by_client: HashMap::new(),
                last_sweep: now,
            }),
        });
        tokio::spawn(revalidate_loop(Arc::downgrade(&inner)));
        Ok(Auth { inner })
    }

    /// Checks a user name and password from `client` and opens a session.
    /// Unknown users cost the same argon2 verification as wrong passwords.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<Session, LoginError> {
        let inner = &self.inner;
        let known_shape = check_name(user).is_ok();
        // Only names a user could have are logged or tracked per user: the
        // field sometimes receives a password typed in the wrong box.
        let shown = if known_shape {
            user
        } else {
            "(not a valid user name)"
        };
        let tracked = known_shape.then_some(user);
        let client_key = client_key(client);
        let started = Instant::now();

        if let Err(retry_after) = inner.reserve_attempt(tracked, client_key, started) {
            tracing::warn!(
                user = shown,
                client = %client,
                outcome = "rate_limited",
                retry_after_s = retry_after.as_secs(),
                "Review login refused: too many failed attempts."
            );
            crate::metrics::global().review_login("rate_limited");
            return Err(LoginError::RateLimited { retry_after });
        }

        let record = if known_shape {
            match read_user(inner.table.as_ref(), user).await {
                Ok(record) => record,
                Err(e) => {
                    inner.release_attempt(tracked, client_key, started);
                    tracing::error!(user = shown, client = %client, outcome = "error", error = %e, "Review login could not read the users table.");
                    crate::metrics::global().review_login("error");
                    return Err(LoginError::Backend(e));
                }
            }
        } else {
            None
        };
        let phc = record
            .as_ref()
            .map_or_else(|| inner.dummy_phc.clone(), |r| r.phc.clone());
        let candidate = password.to_owned();
        let verified =
            match tokio::task::spawn_blocking(move || verify_password(&candidate, &phc)).await {
                Ok(verified) => verified,
                Err(e) => {
                    inner.release_attempt(tracked, client_key, started);
                    crate::metrics::global().review_login("error");
                    return Err(LoginError::Backend(Error::Invalid(format!(
                        "the password check did not finish: {e}"
                    ))));
                }
            };

        match record {
            Some(record) if verified => {
                inner.login_succeeded(user, client_key, started);
                let session = inner.open_session(user, record.role, &record.phc);
                tracing::info!(user, client = %client, role = %record.role, outcome = "ok", "Review login.");
                crate::metrics::global().review_login("ok");
                Ok(session)
            }
            _ => {
                tracing::warn!(user = shown, client = %client, outcome = "invalid", "Review login failed: invalid user name or password.");
                crate::metrics::global().review_login("invalid");
                Err(LoginError::Invalid)
            }
        }
    }

    /// The session named by the request's `sift_session` cookie, if it is
    /// open and has not expired.
    pub fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let now = Instant::now();
        let mut sessions = self.inner.sessions.lock();
        sessions.sweep_if_due(now, self.inner.ttl);
        for id in cookie_values(headers, SESSION_COOKIE) {
            if !is_hex_token(id, TOKEN_BYTES) {
                continue;
            }
            let key = session_key(id);
            match sessions.by_key.get(&key) {
                Some(stored) if stored.expires > now => {
                    return Some(Session {
                        id: id.to_string(),
                        user: stored.user.clone(),
                        role: stored.role,
                        csrf: stored.csrf.clone(),
                    });
                }
                Some(_) => {
                    sessions.by_key.remove(&key);
                }
                None => {}
            }
        }
        None
    }

    /// Closes a session (no-op when it is not open).
    pub fn logout(&self, session_id: &str) {
        let removed = self
            .inner
            .sessions
            .lock()
            .by_key
            .remove(&session_key(session_id));
        if let Some(stored) = removed {
            tracing::info!(user = %stored.user, "Review logout.");
        }
    }

    /// Whether `token` (a form's `csrf` field) is the session's CSRF token.
    /// Compared in constant time.
    pub fn csrf_ok(&self, session: &Session, token: &str) -> bool {
        !token.is_empty() && ct_eq(session.csrf.as_bytes(), token.as_bytes())
    }

    /// The `Set-Cookie` value that stores the session in the browser.
    pub fn session_cookie(&self, session: &Session) -> HeaderValue {
        let max_age = self.inner.ttl.as_secs() + u64::from(self.inner.ttl.subsec_nanos() > 0);
        self.cookie(SESSION_COOKIE, &session.id, "/", Some(max_age))
    }

    /// The `Set-Cookie` value that removes the session cookie.
    pub fn clear_session_cookie(&self) -> HeaderValue {
        self.cookie(SESSION_COOKIE, "", "/", Some(0))
    }

    /// A fresh login form token and the `Set-Cookie` value carrying the same
    /// token: put the token in the form's hidden `csrf` field.
    pub fn new_login_csrf(&self) -> (String, HeaderValue) {
        let nonce = random_hex(16);
        let token = format!("{nonce}{}", self.inner.login_csrf_mac(&nonce));
        let cookie = self.cookie(LOGIN_CSRF_COOKIE, &token, "/login", None);
        (token, cookie)
    }

    /// The login-form token for a request: the one its `sift_login_csrf`
    /// cookie already holds when this server issued it (so a second login tab,
    /// or a browser's own request for `/favicon.ico` that lands on the login
    /// page, does not expire the form on screen), else a new one with the
    /// cookie to set.
    pub fn login_csrf_for(&self, headers: &HeaderMap) -> (String, Option<HeaderValue>) {
        let reusable = cookie_values(headers, LOGIN_CSRF_COOKIE)
            .into_iter()
            .find(|c| self.login_csrf_ok(headers, c));
        match reusable {
            Some(token) => (token.to_string(), None),
            None => {
                let (token, cookie) = self.new_login_csrf();
                (token, Some(cookie))
            }
        }
    }

    /// Whether a login form's `csrf` field is a token this server issued and
    /// matches the request's `sift_login_csrf` cookie. Compared in constant time.
    pub fn login_csrf_ok(&self, headers: &HeaderMap, token: &str) -> bool {
        if !is_hex_token(token, 32) {
            return false;
        }
        let (nonce, mac) = token.split_at(32);
        if !ct_eq(mac.as_bytes(), self.inner.login_csrf_mac(nonce).as_bytes()) {
            return false;
        }
        cookie_values(headers, LOGIN_CSRF_COOKIE)
            .into_iter()
            .any(|c| ct_eq(c.as_bytes(), token.as_bytes()))
    }

    fn cookie(&self, name: &str, value: &str, path: &str, max_age: Option<u64>) -> HeaderValue {
        let mut cookie = format!("{name}={value}; Path={path}; HttpOnly; SameSite=Strict");
        if let Some(max_age) = max_age {
            cookie.push_str(&format!("; Max-Age={max_age}"));
        }
        if self.inner.secure {
            cookie.push_str("; Secure");
        }
        HeaderValue::from_str(&cookie)
            .expect("cookie names, hex tokens and attributes are visible ASCII")
    }

    /// Checks open sessions against the users table now (the server does it
    /// every 30 seconds).
    #[cfg(test)]
    async fn revalidate(&self) {
        self.inner.revalidate().await;
    }
}

impl Inner {
    /// Takes a failure slot for `user` and `client` if both are under the
    /// limit, else says how long to wait.
    fn reserve_attempt(
        &self,
        user: Option<&str>,
        client: IpAddr,
        now: Instant,
    ) -> Result<(), Duration> {
        let mut failures = self.failures.lock();
        failures.sweep_if_due(now, self.window);
        let mut wait: Option<Duration> = None;
        if let Some(user) = user {
            if let Some(times) = failures.by_user.get_mut(user) {
                wait = wait.max(self.wait(times, now));
            }
        }
        if let Some(times) = failures.by_client.get_mut(&client) {
            wait = wait.max(self.wait(times, now));
        }
        if let Some(wait) = wait {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(Duration::from_secs(secs.max(1)));
        }
        if let Some(user) = user {
            failures
                .by_user
                .entry(user.to_string())
                .or_default()
                .push_back(now);
        }
        failures.by_client.entry(client).or_default().push_back(now);
        Ok(())
    }

    /// Drops failures older than the window; when `times` is at the limit,
    /// how long until the oldest that counts leaves it.
    fn wait(&self, times: &mut VecDeque<Instant>, now: Instant) -> Option<Duration> {
        prune(times, now, self.window);
        if times.len() < self.max_failures {
            return None;
        }
        let leaving = times[times.len() - self.max_failures];
        Some((leaving + self.window).saturating_duration_since(now))
    }

    /// Gives back a slot taken by [`Inner::reserve_attempt`] for an attempt
    /// that could not be checked.
    fn release_attempt(&self, user: Option<&str>, client: IpAddr, at: Instant) {
        let mut failures = self.failures.lock();
        if let Some(user) = user {
            if let Some(times) = failures.by_user.get_mut(user) {
                remove_one(times, at);
            }
        }
        if let Some(times) = failures.by_client.get_mut(&client) {
            remove_one(times, at);
        }
    }

    /// A success clears the user's failures and gives back the client's slot.
    fn login_succeeded(&self, user: &str, client: IpAddr, at: Instant) {
        let mut failures = self.failures.lock();
        failures.by_user.remove(user);
        if let Some(times) = failures.by_client.get_mut(&client) {
            remove_one(times, at);
        }
    }

    fn open_session(&self, user: &str, role: Role, phc: &str) -> Session {
        let id = random_hex(TOKEN_BYTES);
        let csrf = random_hex(TOKEN_BYTES);
        let now = Instant::now();
        let mut sessions = self.sessions.lock();
        sessions.sweep_if_due(now, self.ttl);
        sessions.by_key.insert(
            session_key(&id),
            StoredSession {
                user: user.to_string(),
                role,
                csrf: csrf.clone(),
                expires: now + self.ttl,
                credential: blake3::hash(phc.as_bytes()),
            },
        );
        Session {
            id,
            user: user.to_string(),
            role,
            csrf,
        }
    }

    fn login_csrf_mac(&self, nonce: &str) -> String {
        let mac = blake3::keyed_hash(&self.login_csrf_key, nonce.as_bytes());
        hex(&mac.as_bytes()[..16])
    }

    /// Closes the sessions of users who were removed or whose password
    /// changed, and follows role changes. A table error keeps the sessions.
    async fn revalidate(&self) {
        let users: BTreeSet<String> = self
            .sessions
            .lock()
            .by_key
            .values()
            .map(|s| s.user.clone())
            .collect();
        for user in users {
            let record = match read_user(self.table.as_ref(), &user).await {
                Ok(record) => record,
                Err(e) => {
                    tracing::warn!(user = %user, error = %e, "Could not check a review user's sessions against the users table; keeping them.");
                    continue;
                }
            };
            let mut sessions = self.sessions.lock();
            let before = sessions.by_key.len();
            match record {
                None => sessions.by_key.retain(|_, s| s.user != user),
                Some(record) => {
                    let credential = blake3::hash(record.phc.as_bytes());
                    sessions
                        .by_key
                        .retain(|_, s| s.user != user || s.credential == credential);
                    for s in sessions.by_key.values_mut().filter(|s| s.user == user) {
                        s.role = record.role;
                    }
                }
            }
            let closed = before - sessions.by_key.len();
            if closed > 0 {
                tracing::info!(user = %user, closed, "Closed review sessions of a user who was removed or changed password.");
            }
        }
    }
}

async fn revalidate_loop(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(REVALIDATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.revalidate().await;
    }
}

impl Sessions {
    fn sweep_if_due(&mut self, now: Instant, ttl: Duration) {
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_EVERY.min(ttl) {
            self.by_key.retain(|_, s| s.expires > now);
            self.last_sweep = now;
        }
    }
}

impl Failures {
    fn sweep_if_due(&mut self, now: Instant, window: Duration) {
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_EVERY.min(window) {
            self.by_user.retain(|_, t| {
                prune(t, now, window);
                !t.is_empty()
            });
            self.by_client.retain(|_, t| {
                prune(t, now, window);
                !t.is_empty()
            });
            self.last_sweep = now;
        }
    }
}

fn prune(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        times.pop_front();
    }
}

fn remove_one(times: &mut VecDeque<Instant>, at: Instant) {
    if let Some(i) = times.iter().rposition(|t| *t == at) {
        times.remove(i);
    }
}

/// The address failures are counted under: IPv4 as is (also when mapped
/// into IPv6), IPv6 by its /64 prefix.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The values of every cookie called `name` in the request's `Cookie` headers.
fn cookie_values<'h>(headers: &'h HeaderMap, name: &str) -> Vec<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .filter(|(n, _)| n.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .collect()
}

fn session_key(id: &str) -> [u8; 32] {
    *blake3::hash(id.as_bytes()).as_bytes()
}

/// Equality whose time does not depend on where the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // BLAKE3 hashes compare in constant time; hashing first also hides the
    // position of the first difference for inputs of any length.
    blake3::hash(a) == blake3::hash(b)
}

fn is_hex_token(s: &str, bytes: usize) -> bool {
    s.len() == bytes * 2 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex(&buf)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// A user's row.
struct UserRecord {
    phc: String,
    role: Role,
}

async fn read_user(table: &dyn Table, name: &str) -> crate::Result<Option<UserRecord>> {
    let families = [USERS_FAMILY.to_string()];
    let Some(row) = table
        .get(USERS_TABLE, name.as_bytes(), Some(&families))
        .await?
    else {
        return Ok(None);
    };
    let cell = |q: &str| {
        row.get(USERS_FAMILY, q.as_bytes())
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_string)
    };
    let broken = |what: &str| {
        Error::Invalid(format!(
            "review user `{name}` in table `{USERS_TABLE}` has {what}; remove the user with `sift review user remove {name}` and add it again"
        ))
    };
    let phc = cell(Q_HASH).ok_or_else(|| broken("no password hash"))?;
    let role = cell(Q_ROLE)
        .and_then(|r| r.parse::<Role>().ok())
        .ok_or_else(|| broken("no valid role"))?;
    Ok(Some(UserRecord { phc, role }))
}

/// User names: 1-64 of `a-z A-Z 0-9 . _ - @`.
fn check_name(name: &str) -> crate::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid review user name `{}`: use 1-{MAX_NAME_CHARS} characters of a-z, A-Z, 0-9, `.`, `_`, `-` and `@`",
            name.escape_debug()
        )))
    }
}

fn check_password(password: &str) -> crate::Result<()> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(Error::Invalid(format!(
            "the password is too short: use at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    Ok(())
}

async fn hash_blocking(password: String) -> crate::Result<String> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| Error::Invalid(format!("hashing the password did not finish: {e}")))?
}

/// Adds a user. Refuses an existing user, a name that is not 1-64 of
/// `a-z A-Z 0-9 . _ - @`, and a password under 8 characters.
pub async fn add_user(
    table: &dyn Table,
    name: &str,
    password: &str,
    role: Role,
) -> crate::Result<()> {
    check_name(name)?;
    check_password(password)?;
    table.ensure_table(USERS_TABLE, &[USERS_FAMILY]).await?;
    if table
        .get(USERS_TABLE, name.as_bytes(), None)
        .await?
        .is_some()
    {
        return Err(Error::Invalid(format!(
            "review user `{name}` already exists: change its password with `sift review user passwd {name}`, or remove it first with `sift review user remove {name}`"
        )));
    }
    let phc = hash_blocking(password.to_owned()).await?;
    let row = RowPut::new(name.to_string())
        .cell(USERS_FAMILY, Q_HASH, phc)
        .cell(USERS_FAMILY, Q_ROLE, role.as_str())
        .cell(USERS_FAMILY, Q_CREATED_AT_MS, crate::now_ms().to_string());
    table.put(USERS_TABLE, vec![row]).await?;
    tracing::info!(user = name, role = %role, "Added review user.");
    Ok(())
}

/// Removes a user; false when there was none. A running review server closes
/// the user's sessions within 30 seconds.
pub async fn remove_user(table: &dyn Table, name: &str) -> crate::Result<bool> {
    check_name(name)?;
    table.ensure_table(USERS_TABLE, &[USERS_FAMILY]).await?;
    if table
        .get(USERS_TABLE, name.as_bytes(), None)
        .await?
        .is_none()
    {
        return Ok(false);
    }
    table
        .delete(USERS_TABLE, name.as_bytes(), Delete::Row)
        .await?;
    tracing::info!(user = name, "Removed review user.");
    Ok(true)
}

/// Sets a user's password (at least 8 characters); an error when the user
/// does not exist. A running review server closes the user's sessions within
/// 30 seconds.
pub async fn set_password(table: &dyn Table, name: &str, password: &str) -> crate::Result<()> {
    check_name(name)?;
    check_password(password)?;
    table.ensure_table(USERS_TABLE, &[USERS_FAMILY]).await?;
    if read_user(table, name).await?.is_none() {
        return Err(Error::Invalid(format!(
            "there is no review user `{name}`: add it with `sift review user add {name}`"
        )));
    }
    let phc = hash_blocking(password.to_owned()).await?;
    let row = RowPut::new(name.to_string()).cell(USERS_FAMILY, Q_HASH, phc);
    table.put(USERS_TABLE, vec![row]).await?;
    tracing::info!(user = name, "Changed a review user's password.");
    Ok(())
}

/// Every user and role, sorted by name.
pub async fn list_users(table: &dyn Table) -> crate::Result<Vec<(String, Role)>> {
    table.ensure_table(USERS_TABLE, &[USERS_FAMILY]).await?;
    let scan = Scan {
        families: Some(vec![USERS_FAMILY.to_string()]),
        ..Scan::default()
    };
    let mut users = Vec::new();
    for row in table.scan(USERS_TABLE, &scan).await? {
        let name = String::from_utf8_lossy(&row.key).into_owned();
        let role = row
            .get(USERS_FAMILY, Q_ROLE.as_bytes())
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|r| r.parse::<Role>().ok())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "review user `{name}` in table `{USERS_TABLE}` has no valid role; remove the user with `sift review user remove {name}` and add it again"
                ))
            })?;
        users.push((name, role));
    }
    Ok(users)
}

/// Hashes a password with argon2id (argon2's default cost) and a random salt,
/// as a PHC string.
pub fn hash_password(password: &str) -> crate::Result<String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt)
        .map_err(|e| Error::Invalid(format!("could not encode a password salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Invalid(format!("could not hash the password: {e}")))
}

/// Whether `password` matches a PHC string from [`hash_password`] (the cost
/// parameters are read from the string). False for a malformed string.
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use axum::http::HeaderValue;

    use super::*;
    use crate::backends::table::EmbeddedTable;

    const PASSWORD: &str = "correct horse battery";

    fn table() -> anyhow::Result<(tempfile::TempDir, Arc<dyn Table>)> {
        let dir = tempfile::tempdir()?;
        let table: Arc<dyn Table> = Arc::new(EmbeddedTable::open(&dir.path().join("t.redb"))?);
        Ok((dir, table))
    }

    fn config(attempts: u32, ttl: Duration) -> ReviewConfig {
        ReviewConfig {
            login_attempts_per_minute: attempts,
            session_ttl: ttl,
            ..ReviewConfig::default()
        }
    }

    async fn auth_with(
        attempts: u32,
        ttl: Duration,
        window: Duration,
    ) -> anyhow::Result<(tempfile::TempDir, Arc<dyn Table>, Auth)> {
        let (dir, table) = table()?;
        let auth = Auth::with_window(table.clone(), &config(attempts, ttl), false, window).await?;
        add_user(table.as_ref(), "alice", PASSWORD, Role::Reviewer).await?;
        add_user(table.as_ref(), "bob@example.org", PASSWORD, Role::Admin).await?;
        Ok((dir, table, auth))
    }

    async fn auth(attempts: u32) -> anyhow::Result<(tempfile::TempDir, Arc<dyn Table>, Auth)> {
        auth_with(attempts, Duration::from_secs(3600), RATE_WINDOW).await
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn cookies(value: &str) -> anyhow::Result<HeaderMap> {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_str(value)?);
        Ok(headers)
    }

    fn is_invalid(r: &Result<Session, LoginError>) -> bool {
        matches!(r, Err(LoginError::Invalid))
    }

    fn retry_after(r: &Result<Session, LoginError>) -> Option<Duration> {
        match r {
            Err(LoginError::RateLimited { retry_after }) => Some(*retry_after),
            _ => None,
        }
    }

    #[test]
    fn hashes_and_verifies_passwords() -> anyhow::Result<()> {
        let phc = hash_password(PASSWORD)?;
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_password(PASSWORD, &phc));
        assert!(!verify_password("correct horse battery ", &phc));
        assert!(!verify_password("", &phc));
        assert!(!verify_password(PASSWORD, "not a hash"));
        assert!(!verify_password(PASSWORD, ""));
        let again = hash_password(PASSWORD)?;
        assert_ne!(phc, again, "each hash has its own salt");
        assert!(verify_password(PASSWORD, &again));
        Ok(())
    }

    #[test]
    fn roles_parse_and_print() -> anyhow::Result<()> {
        for role in [Role::Reviewer, Role::Admin] {
            assert_eq!(role.to_string().parse::<Role>()?, role);
            assert_eq!(serde_json::to_string(&role)?, format!("\"{role}\""));
            assert_eq!(
                <Role as clap::ValueEnum>::from_str(role.as_str(), false).ok(),
                Some(role)
            );
        }
        assert!("root".parse::<Role>().is_err());
        Ok(())
    }

    #[tokio::test]
    async fn manages_users() -> anyhow::Result<()> {
        let (_dir, table) = table()?;
        let t = table.as_ref();
        assert!(list_users(t).await?.is_empty());
        add_user(t, "carol", PASSWORD, Role::Admin).await?;
        add_user(t, "alice.smith_2-x@example.org", PASSWORD, Role::Reviewer).await?;
        assert_eq!(
            list_users(t).await?,
            vec![
                ("alice.smith_2-x@example.org".to_string(), Role::Reviewer),
                ("carol".to_string(), Role::Admin)
            ]
        );
        let row = t
            .get(USERS_TABLE, b"carol", None)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no row"))?;
        let phc = std::str::from_utf8(row.get(USERS_FAMILY, b"hash").map_or(&[][..], |v| v))?;
        assert!(verify_password(PASSWORD, phc));
        assert_eq!(
            row.get(USERS_FAMILY, b"role").map(|v| &v[..]),
            Some(&b"admin"[..])
        );
        let created: i64 = std::str::from_utf8(
            row.get(USERS_FAMILY, b"created_at_ms")
                .map_or(&[][..], |v| v),
        )?
        .parse()?;
        assert!((crate::now_ms() - created).abs() < 60_000);

        let err = add_user(t, "carol", "another password", Role::Reviewer)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("duplicate accepted"))?;
        assert!(err.to_string().contains("already exists"), "{err}");
        for bad in ["", "has space", "slash/y", "émile", "a;b", &"x".repeat(65)] {
            let err = add_user(t, bad, PASSWORD, Role::Reviewer)
                .await
                .err()
                .ok_or_else(|| anyhow::anyhow!("name {bad:?} accepted"))?;
            assert!(
                err.to_string().contains("invalid review user name"),
                "{err}"
            );
        }
        add_user(t, &"x".repeat(64), PASSWORD, Role::Reviewer).await?;
        let err = add_user(t, "dave", "short77", Role::Reviewer)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("short password accepted"))?;
        assert!(err.to_string().contains("at least 8"), "{err}");
        assert_eq!(list_users(t).await?.len(), 3);

        set_password(t, "carol", "a new password").await?;
        let row = t
            .get(USERS_TABLE, b"carol", None)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no row"))?;
        let phc = std::str::from_utf8(row.get(USERS_FAMILY, b"hash").map_or(&[][..], |v| v))?;
        assert!(verify_password("a new password", phc));
        assert!(!verify_password(PASSWORD, phc));
        assert_eq!(
            row.get(USERS_FAMILY, b"role").map(|v| &v[..]),
            Some(&b"admin"[..])
        );
        assert!(set_password(t, "carol", "short").await.is_err());
        let err = set_password(t, "nobody", "a new password")
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("password set on a missing user"))?;
        assert!(err.to_string().contains("no review user `nobody`"), "{err}");
        assert!(t.get(USERS_TABLE, b"nobody", None).await?.is_none());

        assert!(remove_user(t, "carol").await?);
        assert!(!remove_user(t, "carol").await?);
        assert_eq!(list_users(t).await?.len(), 2);
        add_user(t, "carol", PASSWORD, Role::Reviewer).await?;
        assert_eq!(list_users(t).await?.len(), 3);
        Ok(())
    }

    #[tokio::test]
    async fn refuses_unusable_settings() -> anyhow::Result<()> {
        let (_dir, table) = table()?;
        let err = Auth::new(table.clone(), &config(0, Duration::from_secs(60)), false)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("0 attempts accepted"))?;
        assert!(
            err.to_string().contains("login_attempts_per_minute"),
            "{err}"
        );
        assert!(Auth::new(table.clone(), &config(5, Duration::ZERO), false)
            .await
            .is_err());
        let auth = Auth::new(table.clone(), &ReviewConfig::default(), true).await?;
        let shown = format!("{auth:?}");
        assert!(shown.contains("sessions: 0"), "{shown}");
        Ok(())
    }

    #[tokio::test]
    async fn logs_in_and_finds_the_session() -> anyhow::Result<()> {
        let (_dir, _table, auth) = auth(5).await?;
        let session = auth.login("bob@example.org", PASSWORD, ip(1)).await?;
        assert_eq!(session.user, "bob@example.org");
        assert_eq!(session.role, Role::Admin);
        assert!(is_hex_token(&session.id, 32) && is_hex_token(&session.csrf, 32));
        assert_ne!(session.id, session.csrf);

        assert!(is_invalid(
            &auth.login("alice", "wrong password", ip(1)).await
        ));
        assert!(is_invalid(&auth.login("nobody", PASSWORD, ip(1)).await));
        assert!(is_invalid(&auth.login("", PASSWORD, ip(1)).await));
        assert!(is_invalid(&auth.login("Alice", PASSWORD, ip(1)).await));
        assert!(is_invalid(&auth.login("alice", "", ip(1)).await));

        let header = format!(
            "theme=dark; {SESSION_COOKIE}={}; {LOGIN_CSRF_COOKIE}=abc; other=\"x=y\"",
            session.id
        );
        let found = auth
            .session(&cookies(&header)?)
            .ok_or_else(|| anyhow::anyhow!("session not found"))?;
        assert_eq!(found.id, session.id);
        assert_eq!(found.user, session.user);
        assert_eq!(found.role, Role::Admin);
        assert_eq!(found.csrf, session.csrf);
        // The cookie in a second Cookie header line, after a stale one.
        let mut headers = cookies(&format!("{SESSION_COOKIE}={}", "0".repeat(64)))?;
        headers.append(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b;{SESSION_COOKIE}={}", session.id))?,
        );
        assert!(auth.session(&headers).is_some());

        assert!(auth.session(&HeaderMap::new()).is_none());
        assert!(auth.session(&cookies("theme=dark")?).is_none());
        let mut forged = session.id.clone();
        forged.replace_range(..1, if forged.starts_with('0') { "1" } else { "0" });
        assert!(auth
            .session(&cookies(&format!("{SESSION_COOKIE}={forged}"))?)
            .is_none());
        assert!(auth
            .session(&cookies(&format!("x{SESSION_COOKIE}={}", session.id))?)
            .is_none());

        let second = auth.login("alice", PASSWORD, ip(2)).await?;
        assert_ne!(second.id, session.id);
        assert_eq!(second.role, Role::Reviewer);

        auth.logout(&session.id);
        assert!(auth.session(&cookies(&header)?).is_none());
        assert!(auth
            .session(&cookies(&format!("{SESSION_COOKIE}={}", second.id))?)
            .is_some());
        auth.logout("not a session");
        Ok(())
    }

    #[tokio::test]
    async fn checks_session_csrf_tokens() -> anyhow::Result<()> {
        let (_dir, _table, auth) = auth(5).await?;
        let a = auth.login("alice", PASSWORD, ip(1)).await?;
        let b = auth.login("bob@example.org", PASSWORD, ip(1)).await?;
        assert!(auth.csrf_ok(&a, &a.csrf));
        assert!(!auth.csrf_ok(&a, &b.csrf));
        assert!(!auth.csrf_ok(&a, ""));
        assert!(!auth.csrf_ok(&a, &a.csrf[..63]));
        assert!(!auth.csrf_ok(&a, &format!("{}0", a.csrf)));
        assert!(!auth.csrf_ok(&a, &a.csrf.to_uppercase()));
        Ok(())
    }

    #[tokio::test]
    async fn sessions_expire_and_are_swept() -> anyhow::Result<()> {
        let ttl = Duration::from_millis(300);
        let (_dir, _table, auth) = auth_with(5, ttl, RATE_WINDOW).await?;
        let a = auth.login("alice", PASSWORD, ip(1)).await?;
        let b = auth.login("alice", PASSWORD, ip(1)).await?;
        let header_a = cookies(&format!("{SESSION_COOKIE}={}", a.id))?;
        assert!(auth.session(&header_a).is_some());
        assert_eq!(auth.inner.sessions.lock().by_key.len(), 2);
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        assert!(auth.session(&header_a).is_none());
        assert_eq!(
            auth.inner.sessions.lock().by_key.len(),
            0,
            "the unused session {} was swept too",
            b.user
        );
        // A session opened after the sweep lives a full TTL again.
        let c = auth.login("alice", PASSWORD, ip(1)).await?;
        assert!(auth
            .session(&cookies(&format!("{SESSION_COOKIE}={}", c.id))?)
            .is_some());
        Ok(())
    }

    #[tokio::test]
    async fn limits_failures_per_user() -> anyhow::Result<()> {
        let (_dir, _table, auth) = auth(3).await?;
        for i in 0..3 {
            assert!(is_invalid(
                &auth.login("alice", "wrong password", ip(10 + i)).await
            ));
        }
        // The right password from a fresh address is refused without a check.
        let wait = retry_after(&auth.login("alice", PASSWORD, ip(20)).await)
            .ok_or_else(|| anyhow::anyhow!("not rate limited"))?;
        assert!(
            wait >= Duration::from_secs(58) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert_eq!(wait.subsec_nanos(), 0);
        // Other users and the same addresses are not affected by alice's limit.
        auth.login("bob@example.org", PASSWORD, ip(10)).await?;
        let message = LoginError::RateLimited { retry_after: wait }.to_string();
        assert!(
            message.contains("wait") && message.contains("seconds"),
            "{message}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn limits_failures_per_client() -> anyhow::Result<()> {
        let (_dir, _table, auth) = auth(3).await?;
        for user in ["nobody", "alice", "x y z"] {
            assert!(is_invalid(&auth.login(user, "wrong password", ip(7)).await));
        }
        assert!(retry_after(&auth.login("alice", PASSWORD, ip(7)).await).is_some());
        assert!(retry_after(&auth.login("bob@example.org", PASSWORD, ip(7)).await).is_some());
        // alice has 1 failure only: from elsewhere she gets in.
        auth.login("alice", PASSWORD, ip(8)).await?;
        // The same address mapped into IPv6 counts as the same client.
        let mapped: IpAddr = "::ffff:192.0.2.7".parse()?;
        assert!(retry_after(&auth.login("alice", PASSWORD, mapped).await).is_some());
        Ok(())
    }

    #[tokio::test]
    async fn counts_ipv6_clients_by_their_64() -> anyhow::Result<()> {
        let (_dir, _table, auth) = auth(2).await?;
        for host in ["2001:db8:1:2::1", "2001:db8:1:2::2"] {
            assert!(is_invalid(
                &auth.login("nobody", "wrong", host.parse()?).await
            ));
        }
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse()?;
        assert!(retry_after(&auth.login("alice", PASSWORD, same_64).await).is_some());
        auth.login("alice", PASSWORD, "2001:db8:1:3::1".parse()?)
            .await?;
        Ok(())
    }

    #[tokio::test]
    async fn success_clears_the_users_failures() -> anyhow::Result<()> {
        let (_dir, _table, auth) = auth(3).await?;
        let mut last = 0;
        let mut next_ip = || {
            last += 1;
            ip(last)
        };
        for _ in 0..2 {
            assert!(is_invalid(
                &auth.login("alice", "wrong password", next_ip()).await
            ));
        }
        auth.login("alice", PASSWORD, next_ip()).await?;
        for _ in 0..2 {
            assert!(is_invalid(
                &auth.login("alice", "wrong password", next_ip()).await
            ));
        }
        // 4 failures in the minute, but only 2 since the success.
        auth.login("alice", PASSWORD, next_ip()).await?;
        for _ in 0..3 {
            assert!(is_invalid(
                &auth.login("alice", "wrong password", next_ip()).await
            ));
        }
        assert!(retry_after(&auth.login("alice", PASSWORD, next_ip()).await).is_some());
        Ok(())
    }

    #[tokio::test]
    async fn failures_leave_the_window() -> anyhow::Result<()> {
        // Long enough that two password checks on a loaded machine (a debug
        // build, other suites running) stay inside it.
        let window = Duration::from_secs(3);
        let (_dir, _table, auth) = auth_with(2, Duration::from_secs(60), window).await?;
        for _ in 0..2 {
            assert!(is_invalid(
                &auth.login("alice", "wrong password", ip(1)).await
            ));
        }
        let wait = retry_after(&auth.login("alice", PASSWORD, ip(1)).await)
            .ok_or_else(|| anyhow::anyhow!("not rate limited"))?;
        assert!(
            wait.subsec_nanos() == 0 && wait >= Duration::from_secs(1) && wait <= window,
            "{wait:?}: what is left of the window, rounded up to a whole second"
        );
        tokio::time::sleep(window + Duration::from_millis(50)).await;
        auth.login("alice", PASSWORD, ip(1)).await?;
        Ok(())
    }

    #[tokio::test]
    async fn concurrent_guesses_cannot_overrun_the_limit() -> anyhow::Result<()> {
        let (_dir, _table, auth) = auth(3).await?;
        let guesses = (0..10).map(|i| {
            let auth = auth.clone();
            async move {
                auth.login("alice", &format!("guess number {i}"), ip(1))
                    .await
            }
        });
        let results = futures::future::join_all(guesses).await;
        let checked = results.iter().filter(|r| is_invalid(r)).count();
        let limited = results.iter().filter(|r| retry_after(r).is_some()).count();
        assert_eq!((checked, limited), (3, 7));
        Ok(())
    }

    #[tokio::test]
    async fn unknown_users_cost_a_verification() -> anyhow::Result<()> {
        let (_dir, _table, auth) = auth(100).await?;
        let mut known = Duration::MAX;
        let mut unknown = Duration::MAX;
        for i in 0..3 {
            let t = Instant::now();
            assert!(is_invalid(
                &auth.login("alice", "wrong password", ip(i)).await
            ));
            known = known.min(t.elapsed());
            let t = Instant::now();
            assert!(is_invalid(
                &auth.login("nobody", "wrong password", ip(i)).await
            ));
            unknown = unknown.min(t.elapsed());
        }
        assert!(
            unknown * 3 >= known,
            "unknown user took {unknown:?}, wrong password {known:?}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn closes_sessions_of_removed_users_and_changed_passwords() -> anyhow::Result<()> {
        let (_dir, table, auth) = auth(5).await?;
        let alice = auth.login("alice", PASSWORD, ip(1)).await?;
        let bob = auth.login("bob@example.org", PASSWORD, ip(1)).await?;
        let alice_cookie = cookies(&format!("{SESSION_COOKIE}={}", alice.id))?;
        let bob_cookie = cookies(&format!("{SESSION_COOKIE}={}", bob.id))?;
        auth.revalidate().await;
        assert!(auth.session(&alice_cookie).is_some());
        assert!(auth.session(&bob_cookie).is_some());

        assert!(remove_user(table.as_ref(), "alice").await?);
        set_password(table.as_ref(), "bob@example.org", "a brand new one").await?;
        auth.revalidate().await;
        assert!(auth.session(&alice_cookie).is_none());
        assert!(auth.session(&bob_cookie).is_none());
        let bob = auth
            .login("bob@example.org", "a brand new one", ip(1))
            .await?;
        auth.revalidate().await;
        assert!(auth
            .session(&cookies(&format!("{SESSION_COOKIE}={}", bob.id))?)
            .is_some());
        Ok(())
    }

    #[tokio::test]
    async fn sets_cookie_attributes() -> anyhow::Result<()> {
        let (_dir, table) = table()?;
        add_user(table.as_ref(), "alice", PASSWORD, Role::Reviewer).await?;
        let ttl = Duration::from_secs(12 * 3600);
        for secure in [false, true] {
            let auth = Auth::new(table.clone(), &config(5, ttl), secure).await?;
            let session = auth.login("alice", PASSWORD, ip(1)).await?;
            let suffix = if secure { "; Secure" } else { "" };
            assert_eq!(
                auth.session_cookie(&session).to_str()?,
                format!(
                    "sift_session={}; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200{suffix}",
                    session.id
                )
            );
            assert_eq!(
                auth.clear_session_cookie().to_str()?,
                format!("sift_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{suffix}")
            );
            let (token, cookie) = auth.new_login_csrf();
            assert!(is_hex_token(&token, 32));
            assert_eq!(
                cookie.to_str()?,
                format!("sift_login_csrf={token}; Path=/login; HttpOnly; SameSite=Strict{suffix}")
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn checks_login_csrf_tokens() -> anyhow::Result<()> {
        let (_dir, table) = table()?;
        let auth = Auth::new(table.clone(), &ReviewConfig::default(), false).await?;
        let (token, _) = auth.new_login_csrf();
        let (other, _) = auth.new_login_csrf();
        assert_ne!(token, other);
        let with_cookie = |v: &str| cookies(&format!("a=1; {LOGIN_CSRF_COOKIE}={v}; b=2"));
        assert!(auth.login_csrf_ok(&with_cookie(&token)?, &token));
        assert!(!auth.login_csrf_ok(&with_cookie(&token)?, &other));
        assert!(!auth.login_csrf_ok(&with_cookie(&token)?, ""));
        assert!(!auth.login_csrf_ok(&HeaderMap::new(), &token));
        assert!(!auth.login_csrf_ok(&cookies(&format!("{SESSION_COOKIE}={token}"))?, &token));
        // A cookie planted with a made-up token: matching field, no valid MAC.
        let planted = "ab".repeat(32);
        assert!(!auth.login_csrf_ok(&with_cookie(&planted)?, &planted));
        // A token from another server (another key) is refused too.
        let elsewhere = Auth::new(table.clone(), &ReviewConfig::default(), false).await?;
        let (foreign, _) = elsewhere.new_login_csrf();
        assert!(!auth.login_csrf_ok(&with_cookie(&foreign)?, &foreign));
        assert!(elsewhere.login_csrf_ok(&with_cookie(&foreign)?, &foreign));
        // A page load that carries a valid token keeps it; a planted or
        // missing one gets a fresh token and cookie.
        assert_eq!(
            auth.login_csrf_for(&with_cookie(&token)?),
            (token.clone(), None)
        );
        let (fresh, cookie) = auth.login_csrf_for(&with_cookie(&planted)?);
        assert!(fresh != planted && cookie.is_some());
        assert!(auth.login_csrf_for(&HeaderMap::new()).1.is_some());
        Ok(())
    }

    #[tokio::test]
    async fn counts_logins() -> anyhow::Result<()> {
        let (_dir, _table, auth) = auth(1).await?;
        let count = |outcome: &str| {
            crate::metrics::global()
                .review_logins
                .get_or_create(&crate::metrics::OutcomeLabel {
                    outcome: outcome.to_string(),
                })
                .get()
        };
        let (ok, invalid, limited) = (count("ok"), count("invalid"), count("rate_limited"));
        auth.login("alice", PASSWORD, ip(1)).await?;
        assert!(is_invalid(
            &auth.login("alice", "wrong password", ip(1)).await
        ));
        assert!(retry_after(&auth.login("alice", PASSWORD, ip(2)).await).is_some());
        // Other tests run at the same time in this process: at least ours.
        assert!(count("ok") > ok);
        assert!(count("invalid") > invalid);
        assert!(count("rate_limited") > limited);
        Ok(())
    }
}
