//! Authentication of a request: the Authorization header for a host's challenge, Basic from
//! the caller's identity, Bearer tokens from the challenge's realm (fetched once per
//! (host, scope) and cached until they expire). The wire formats are in [`super::super::auth`].

use std::collections::HashMap;
use std::time::Instant;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderValue};

use super::{
    Call, Client, Failed, OAUTH_CLIENT_ID, SMALL_BODY_MAX, Sent, TokenSlot, read_body,
    read_envelope,
};
use crate::registry::auth::{Scheme, Token, TokenResponse};
use crate::registry::credentials::{self, Identity, Secret};
use crate::registry::errors::{self, Error, Subject};

impl Client {
    /// The Authorization header for `call`, from what its host asked for last time.
    pub(super) async fn authorization(
        &self,
        call: &Call,
        scope: Option<&str>,
    ) -> Result<Sent, Error> {
        let scheme = self.lock_challenges().get(&call.host).cloned();
        match scheme {
            None => Ok(Sent {
                header: None,
                bearer: None,
            }),
            Some(Scheme::Basic) => match self.identity(&call.registry).await {
                Some(Identity::Password(c)) => Ok(Sent {
                    header: Some(basic_header(&c.username, &c.password)),
                    bearer: None,
                }),
                _ => Err(Error::AuthenticationRequired {
                    name: call.subject.name().to_owned(),
                }),
            },
            Some(Scheme::Bearer { realm, service }) => {
                let token = self.token(call, &realm, service.as_deref(), scope).await?;
                let mut header = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                    .map_err(|_| Error::Token {
                        url: realm.clone(),
                        reason: "the token is not a valid header value".to_owned(),
                    })?;
                header.set_sensitive(true);
                Ok(Sent {
                    header: Some(header),
                    bearer: Some(token),
                })
            }
        }
    }

    fn token_slot(&self, host: &str, scope: Option<&str>) -> TokenSlot {
        let key = (host.to_owned(), scope.unwrap_or_default().to_owned());
        self.inner
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    /// A fresh token for (host, scope): the cached one, or one from the realm.
    async fn token(
        &self,
        call: &Call,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<Secret, Error> {
        let slot = self.token_slot(&call.host, scope);
        let mut cached = slot.lock().await;
        if let Some(token) = cached.as_ref().filter(|t| t.is_fresh(Instant::now())) {
            return Ok(token.value.clone());
        }
        let token = self.fetch_token(call, realm, service, scope).await?;
        let value = token.value.clone();
        *cached = Some(token);
        Ok(value)
    }

    /// Drop the cached token for (host, scope) if it is still `used` (another request may
    /// have replaced it already).
    pub(super) async fn forget_token(&self, host: &str, scope: Option<&str>, used: &Secret) {
        let slot = self.token_slot(host, scope);
        let mut cached = slot.lock().await;
        if cached.as_ref().is_some_and(|t| t.value == *used) {
            *cached = None;
        }
    }

    /// Ask the realm for a token (see `auth` for the protocol).
    async fn fetch_token(
        &self,
        call: &Call,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<Token, Error> {
        let identity = self.identity(&call.registry).await;
        let refresh_token = match &identity {
            Some(Identity::RefreshToken(token)) => Some(token.clone()),
            _ => None,
        };
        // A refresh token goes in a POST form with service and scope; else they are query
        // parameters of the GET.
        let url = token_url(realm, service, scope, refresh_token.is_none())?;
        let shown = url.to_string();
        let timeout = self.inner.config.timeout;
        let subject = Subject::Other {
            name: call.subject.name().to_owned(),
        };
        let attempt = || async {
            let request = match &refresh_token {
                Some(refresh) => {
                    let mut form = vec![
                        ("grant_type", "refresh_token"),
                        ("refresh_token", refresh.expose()),
                        ("client_id", OAUTH_CLIENT_ID),
                    ];
                    if let Some(service) = service {
                        form.push(("service", service));
                    }
                    if let Some(scope) = scope {
                        form.push(("scope", scope));
                    }
                    self.inner.http.post(url.clone()).form(&form)
                }
                None => {
                    let request = self.inner.http.get(url.clone());
                    match &identity {
                        Some(Identity::Password(c)) => {
                            request.header(AUTHORIZATION, basic_header(&c.username, &c.password))
                        }
                        _ => request,
                    }
                }
            };
            let response = request
                .send()
                .await
                .map_err(|e| errors::from_reqwest(&shown, &e, timeout))?;
            // Any other answer is dealt with below, once.
            if !errors::is_transient_status(response.status()) {
                return Ok(response);
            }
            Err(Failed::status(response, &shown, &subject).await)
        };
        let response = self
            .inner
            .retry
            .run(|_| attempt(), |f: &Failed| f.verdict)
            .await
            .map_err(|f| f.error)?;
        token_from_response(response, shown, call, identity, &subject, timeout).await
    }

    /// Who we are at `registry`: the explicit credentials, else the docker config's.
    pub(super) async fn identity(&self, registry: &str) -> Option<Identity> {
        let config = &self.inner.config;
        if let Some(credentials) = &config.credentials {
            return Some(Identity::Password(credentials.clone()));
        }
        if !config.use_docker_config {
            return None;
        }
        if let Some(known) = self.lock_identities().get(registry) {
            return known.clone();
        }
        let path = config
            .docker_config
            .clone()
            .or_else(credentials::default_docker_config)?;
        let key = registry.to_owned();
        let looked_up =
            tokio::task::spawn_blocking(move || credentials::from_docker_config(&path, &key)).await;
        let identity = match looked_up {
            Ok(Ok(identity)) => identity,
            Ok(Err(e)) => {
                // Anonymous access may still work; if not, the auth error says what to do.
                tracing::warn!("{e}; continuing without credentials");
                None
            }
            Err(e) => {
                tracing::warn!("docker credential lookup for {registry} failed: {e}");
                None
            }
        };
        self.lock_identities()
            .insert(registry.to_owned(), identity.clone());
        identity
    }

    fn lock_identities(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Identity>>> {
        self.inner
            .identities
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// The token endpoint from a challenge's realm (http or https only), with `service` and
/// each scope of `scope` (space-separated) as query parameters when `in_query`.
fn token_url(
    realm: &str,
    service: Option<&str>,
    scope: Option<&str>,
    in_query: bool,
) -> Result<url::Url, Error> {
    let mut url = url::Url::parse(realm).map_err(|e| Error::Url {
        url: realm.to_owned(),
        reason: format!("token realm from the registry's challenge: {e}"),
    })?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(Error::Url {
            url: realm.to_owned(),
            reason: "token realm is not an http(s) URL".to_owned(),
        });
    }
    if in_query && (service.is_some() || scope.is_some()) {
        let mut query = url.query_pairs_mut();
        if let Some(service) = service {
            query.append_pair("service", service);
        }
        // One `scope` parameter per scope (`token.md`); the OAuth form takes the list as is,
        // space-separated (`oauth.md`).
        for scope in scope.into_iter().flat_map(str::split_whitespace) {
            query.append_pair("scope", scope);
        }
    }
    Ok(url)
}

/// The token in a token endpoint's final answer; a 401 means the credentials (or their
/// absence) were refused.
async fn token_from_response(
    response: reqwest::Response,
    shown: String,
    call: &Call,
    identity: Option<Identity>,
    subject: &Subject,
    timeout: std::time::Duration,
) -> Result<Token, Error> {
    let status = response.status();
    tracing::debug!(url = %shown, %status, "token response");
    let name = call.subject.name().to_owned();
    if status == StatusCode::UNAUTHORIZED {
        return Err(match identity {
            Some(identity) => Error::AuthenticationFailed {
                name,
                identity: identity.describe(),
            },
            None => Error::AuthenticationRequired { name },
        });
    }
    if !status.is_success() {
        let envelope = read_envelope(response).await;
        return Err(errors::from_status(&shown, status, envelope, subject));
    }
    let body = read_body(response, &shown, SMALL_BODY_MAX, timeout).await?;
    let received = Instant::now();
    TokenResponse::parse(&body)
        .and_then(|r| r.into_token(received))
        .map_err(|reason| Error::Token { url: shown, reason })
}

pub(super) fn basic_header(username: &str, password: &Secret) -> HeaderValue {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(format!("{username}:{}", password.expose()));
    let mut header =
        HeaderValue::from_str(&format!("Basic {encoded}")).expect("base64 is a valid header");
    header.set_sensitive(true);
    header
}

#[cfg(test)]
mod tests {
    use super::token_url;

    #[test]
    fn token_urls() {
        let cases = [
            (
                Some("repository:a/b:pull"),
                true,
                "https://t.example/token?service=reg&scope=repository%3Aa%2Fb%3Apull",
            ),
            (
                Some("repository:a:pull,push repository:b:pull"),
                true,
                "https://t.example/token?service=reg&scope=repository%3Aa%3Apull%2Cpush\
                 &scope=repository%3Ab%3Apull",
            ),
            (
                Some("repository:a:pull,push repository:b:pull"),
                false,
                "https://t.example/token",
            ),
            (None, true, "https://t.example/token?service=reg"),
        ];
        for (scope, in_query, want) in cases {
            let got = token_url("https://t.example/token", Some("reg"), scope, in_query).unwrap();
            assert_eq!(got.as_str(), want, "{scope:?}");
        }
    }
}
