//! A logged-in HTTP client of the review UI, as a browser uses it: the login
//! form with its CSRF cookie, then the session cookie on every request.
//! `sift run` checks the UI it started with it, and `sift bench review`
//! times pages through it.

use std::time::Duration;

use super::auth;

/// A logged-in HTTP client.
pub struct Client {
    http: reqwest::Client,
    base: String,
    cookie: String,
}

fn client_error(message: impl std::fmt::Display) -> crate::Error {
    crate::Error::Invalid(format!("review UI: {message}"))
}

fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .find(|pair| pair.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

impl Client {
    /// Logs `user` in to the review UI at `base` (its login form, CSRF
    /// cookie included); `concurrency` is how many requests it will have in
    /// flight at once.
    pub async fn login(
        base: &str,
        user: &str,
        password: &str,
        concurrency: usize,
    ) -> crate::Result<Client> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(concurrency)
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(client_error)?;
        let page = http
            .get(format!("{base}/login"))
            .send()
            .await
            .map_err(client_error)?;
        let csrf_cookie = set_cookie(&page, auth::LOGIN_CSRF_COOKIE)
            .ok_or_else(|| client_error("the login page set no CSRF cookie"))?;
        let token = csrf_cookie
            .split_once('=')
            .map(|(_, v)| v.to_owned())
            .unwrap_or_default();
        let response = http
            .post(format!("{base}/login"))
            .header(reqwest::header::COOKIE, csrf_cookie)
            .form(&[("username", user), ("password", password), ("csrf", &token)])
            .send()
            .await
            .map_err(client_error)?;
        let cookie = set_cookie(&response, auth::SESSION_COOKIE)
            .ok_or_else(|| client_error(format!("login failed: HTTP {}", response.status())))?;
        Ok(Client {
            http,
            base: base.to_owned(),
            cookie,
        })
    }

    /// GETs `path` with the session.
    pub async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.http
            .get(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, &self.cookie)
            .send()
            .await
    }

    /// GETs `path` with the session; returns the status.
    pub async fn status(&self, path: &str) -> crate::Result<u16> {
        let response = self.get(path).await.map_err(client_error)?;
        Ok(response.status().as_u16())
    }
}
