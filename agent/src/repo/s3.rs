//! The S3-compatible client behind a blocking API: `object_store` (multipart uploads,
//! retries with backoff) on a tokio runtime that lives only here, so that the rest of
//! the agent stays synchronous; objects are read and written as `io::Read`/`io::Write`,
//! throttled by one shared rate limit.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    Attribute, Attributes, BackoffConfig, GetOptions, ObjectStore, PutMultipartOptions, PutOptions,
    RetryConfig, WriteMultipart,
};

use super::config::{S3Config, S3Url, join};
use super::{Listed, REPO_MANIFEST, RepoError, RepoManifest, RepoOptions, Repository};

/// Parts of a multipart upload; also the size below which an object is one PUT.
const PART: usize = 16 << 20;
/// Parts in flight per object.
const PARTS_IN_FLIGHT: usize = 2;

/// An object's user metadata (`x-amz-meta-NAME: VALUE`).
pub type Metadata = Vec<(String, String)>;

/// The user metadata that carries the repository manifest's MAC.
pub const MAC_METADATA: &str = "hotbackup-mac";

/// A repository manifest as stored: its bytes and, when sealed, their MAC.
pub struct Sealed {
    pub bytes: Bytes,
    pub mac: Option<String>,
}

/// One bucket, reached from a blocking caller.
pub struct Bucket {
    pub url: S3Url,
    endpoint: String,
    store: AmazonS3,
    runtime: tokio::runtime::Runtime,
    pub limit: Arc<RateLimit>,
}

impl Bucket {
    /// Connects and checks that the bucket answers (a missing bucket or refused
    /// credentials are one clear sentence here, before anything else happens).
    pub fn connect(url: &S3Url, options: &RepoOptions) -> Result<Bucket, RepoError> {
        let config = S3Config::resolve(options)?;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&url.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(15),
                    base: 2.0,
                },
                max_retries: config.retries,
                retry_timeout: Duration::from_secs(300),
            });
        if let Some(token) = &config.session_token {
            builder = builder.with_token(token);
        }
        let endpoint = match &config.endpoint {
            Some(e) => {
                builder = builder
                    .with_endpoint(e)
                    .with_allow_http(e.starts_with("http://"));
                e.clone()
            }
            None => format!("s3.{}.amazonaws.com", config.region),
        };
        let store = builder
            .build()
            .map_err(|e| RepoError::Refused(format!("cannot use {url}: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hotbackup-s3")
            .enable_all()
            .build()
            .map_err(super::io_error("cannot start the S3 client's runtime"))?;
        let bucket = Bucket {
            url: url.clone(),
            endpoint,
            store,
            runtime,
            limit: Arc::new(RateLimit::new(options.limit_rate)),
        };
        // A GET of a key that is not there: its answer tells a missing bucket
        // (NoSuchBucket) from a missing key, and checks the credentials. (Not a listing:
        // it needs no query string, which some S3-compatible servers sign differently.)
        let probe = bucket.key(".hotbackup-probe");
        match bucket.runtime.block_on(bucket.store.get(&probe)) {
            Err(e @ object_store::Error::NotFound { .. })
                if !e.to_string().contains("NoSuchBucket") => {}
            Err(e) => return Err(bucket.error("GET", e)),
            Ok(_) => {}
        }
        Ok(bucket)
    }

    /// The sentence for a failed request.
    pub fn error(&self, what: &str, e: object_store::Error) -> RepoError {
        let text = server_said(&e.to_string());
        let (url, endpoint) = (&self.url, &self.endpoint);
        if text.contains("NoSuchBucket") {
            return RepoError::BucketRefused(format!(
                "the bucket {} does not exist on {endpoint}; create it or fix the URL",
                url.bucket
            ));
        }
        if matches!(
            e,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        ) || text.contains("InvalidAccessKeyId")
            || text.contains("SignatureDoesNotMatch")
        {
            return RepoError::BucketRefused(format!(
                "{endpoint} refused the credentials for {url} (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the credential file): {text}"
            ));
        }
        RepoError::S3(if text.contains("error sending request") {
            format!(
                "cannot reach {endpoint} ({what} in {url} failed after every retry); check --s3-endpoint or AWS_ENDPOINT_URL and the network, then run the command again: {text}"
            )
        } else {
            format!("S3 {what} in {url} on {endpoint} failed: {text}")
        })
    }

    /// The full key of `rel` (relative to the URL's prefix).
    pub fn key(&self, rel: &str) -> Key {
        Key::from(join(&self.url.prefix, rel))
    }

    /// The object's size and user metadata (`x-amz-meta-*`), or None when it does not exist.
    pub fn head(&self, rel: &str) -> Result<Option<(u64, Metadata)>, RepoError> {
        let options = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        match self
            .runtime
            .block_on(self.store.get_opts(&self.key(rel), options))
        {
            Ok(r) => Ok(Some((
                r.meta.size,
                r.attributes
                    .iter()
                    .filter_map(|(k, v)| match k {
                        Attribute::Metadata(k) => Some((k.to_string(), v.to_string())),
                        _ => None,
                    })
                    .collect(),
            ))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("HEAD", e)),
        }
    }

    /// A small object whole, or None when it does not exist.
    pub fn get_small(&self, rel: &str) -> Result<Option<Bytes>, RepoError> {
        let result = self.runtime.block_on(async {
            let r = self.store.get(&self.key(rel)).await?;
            r.bytes().await
        });
        match result {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("GET", e)),
        }
    }

    pub fn put_small(&self, rel: &str, bytes: Vec<u8>) -> Result<(), RepoError> {
        self.limit.take(bytes.len());
        self.runtime
            .block_on(self.store.put(&self.key(rel), bytes.into()))
            .map(|_| ())
            .map_err(|e| self.error("PUT", e))
    }

    /// Streams an object.
    pub fn reader(&self, rel: &str) -> Result<ObjectReader<'_>, RepoError> {
        let stream = self
            .runtime
            .block_on(self.store.get(&self.key(rel)))
            .map_err(|e| self.error(&format!("GET {rel}"), e))?
            .into_stream();
        Ok(ObjectReader {
            bucket: self,
            stream,
            current: Bytes::new(),
        })
    }

    /// Writes an object with user metadata: one PUT when small, multipart when not.
    pub fn writer(&self, rel: &str, metadata: &[(&str, String)]) -> ObjectWriter<'_> {
        let mut attributes = Attributes::new();
        for (k, v) in metadata {
            attributes.insert(Attribute::Metadata(k.to_string().into()), v.clone().into());
        }
        ObjectWriter {
            bucket: self,
            key: self.key(rel),
            attributes,
            buffer: Vec::new(),
            multipart: None,
        }
    }

    /// Names directly under the prefix (`prefix/NAME/...`).
    pub fn children(&self) -> Result<Vec<String>, RepoError> {
        let prefix = Key::from(self.url.prefix.as_str());
        let listed = self
            .runtime
            .block_on(self.store.list_with_delimiter(Some(&prefix)))
            .map_err(|e| self.error("list", e))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Every object under `rel/` (full keys, as the server spells them).
    pub fn list_all(&self, rel: &str) -> Result<Vec<(Key, u64)>, RepoError> {
        let base = self.key(rel);
        self.runtime
            .block_on(async {
                let mut out = Vec::new();
                let mut stream = self.store.list(Some(&base));
                while let Some(meta) = stream.next().await {
                    let meta = meta?;
                    out.push((meta.location, meta.size));
                }
                Ok(out)
            })
            .map_err(|e| self.error("list", e))
    }

    pub fn delete(&self, key: &Key) -> Result<(), RepoError> {
        match self.runtime.block_on(self.store.delete(key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("DELETE", e)),
        }
    }

    /// Reads the repository manifest of the image `name` (None: a partial upload).
    pub fn manifest(&self, name: &str) -> Result<Option<RepoManifest>, RepoError> {
        Ok(self.manifest_sealed(name)?.map(|(m, _)| m))
    }

    /// The repository manifest of `name` with its bytes as stored and the MAC an
    /// encrypted upload sealed them with (see [`super::format::EncryptionKey::seal`]).
    pub fn manifest_sealed(&self, name: &str) -> Result<Option<(RepoManifest, Sealed)>, RepoError> {
        let rel = join(name, REPO_MANIFEST);
        let result = self.runtime.block_on(async {
            let r = self.store.get(&self.key(&rel)).await?;
            let mac = r.attributes.iter().find_map(|(k, v)| match k {
                Attribute::Metadata(k) if k == MAC_METADATA => Some(v.to_string()),
                _ => None,
            });
            Ok::<_, object_store::Error>((r.bytes().await?, mac))
        });
        let (bytes, mac) = match result {
            Ok(v) => v,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error("GET", e)),
        };
        let manifest = serde_json::from_slice(&bytes)
            .map_err(|e| RepoError::S3(format!("{}/{rel} is not readable: {e}", self.url)))?;
        Ok(Some((manifest, Sealed { bytes, mac })))
    }
}

/// The server's error code and message when its XML answer is in `text` (a sentence
/// instead of a page of XML), else `text` on one line.
fn server_said(text: &str) -> String {
    let tag = |t: &str| {
        let start = text.find(&format!("<{t}>"))? + t.len() + 2;
        let end = start + text[start..].find(&format!("</{t}>"))?;
        Some(text[start..end].to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("the server said {code}: {message}"),
        _ => text.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// An object being read, as `io::Read`.
pub struct ObjectReader<'a> {
    bucket: &'a Bucket,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
}

impl io::Read for ObjectReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.bucket.runtime.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(io::Error::other(self.bucket.error("download", e))),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        self.bucket.limit.take(n);
        Ok(n)
    }
}

/// An object being written, as `io::Write`; nothing exists until `finish`.
pub struct ObjectWriter<'a> {
    bucket: &'a Bucket,
    key: Key,
    attributes: Attributes,
    buffer: Vec<u8>,
    multipart: Option<WriteMultipart>,
}

impl ObjectWriter<'_> {
    pub fn finish(mut self) -> Result<(), RepoError> {
        let b = self.bucket;
        let result = match self.multipart.take() {
            Some(upload) => b.runtime.block_on(upload.finish()),
            None => {
                let options = PutOptions {
                    attributes: std::mem::take(&mut self.attributes),
                    ..PutOptions::default()
                };
                let payload = std::mem::take(&mut self.buffer).into();
                b.runtime
                    .block_on(b.store.put_opts(&self.key, payload, options))
            }
        };
        result
            .map(|_| ())
            .map_err(|e| b.error(&format!("upload of {}", self.key), e))
    }
}

impl Drop for ObjectWriter<'_> {
    /// An upload that is not finished is aborted, so that no parts are left behind.
    fn drop(&mut self) {
        if let Some(upload) = self.multipart.take() {
            let _ = self.bucket.runtime.block_on(upload.abort());
        }
    }
}

impl io::Write for ObjectWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let b = self.bucket;
        b.limit.take(buf.len());
        if self.multipart.is_none() {
            self.buffer.extend_from_slice(buf);
            if self.buffer.len() < PART {
                return Ok(buf.len());
            }
            let options = PutMultipartOptions {
                attributes: std::mem::take(&mut self.attributes),
                ..PutMultipartOptions::default()
            };
            let upload = b
                .runtime
                .block_on(b.store.put_multipart_opts(&self.key, options))
                .map_err(|e| io::Error::other(b.error("upload", e)))?;
            let mut upload = WriteMultipart::new_with_chunk_size(upload, PART);
            let _in_runtime = b.runtime.enter();
            upload.put(std::mem::take(&mut self.buffer).into());
            self.multipart = Some(upload);
            return Ok(buf.len());
        }
        let upload = self.multipart.as_mut().expect("multipart started");
        {
            // WriteMultipart spawns each full part as a task on the current runtime.
            let _in_runtime = b.runtime.enter();
            upload.write(buf);
        }
        b.runtime
            .block_on(upload.wait_for_capacity(PARTS_IN_FLIGHT))
            .map_err(|e| io::Error::other(b.error("upload", e)))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `--limit-rate`: every byte sent or received, across all transfers, is paced against
/// one clock.
pub struct RateLimit {
    bytes_per_sec: Option<u64>,
    state: parking_lot::Mutex<(Instant, u64)>,
}

impl RateLimit {
    pub fn new(bytes_per_sec: Option<u64>) -> RateLimit {
        RateLimit {
            bytes_per_sec,
            state: parking_lot::Mutex::new((Instant::now(), 0)),
        }
    }

    pub fn take(&self, n: usize) {
        let Some(rate) = self.bytes_per_sec else {
            return;
        };
        let wait = {
            let mut s = self.state.lock();
            s.1 += n as u64;
            let due = Duration::from_secs_f64(s.1 as f64 / rate as f64);
            due.saturating_sub(s.0.elapsed())
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// Images under `s3://bucket/prefix`.
pub struct S3Repo {
    pub bucket: Bucket,
}

impl S3Repo {
    pub fn connect(url: &S3Url, options: &RepoOptions) -> Result<S3Repo, RepoError> {
        Ok(S3Repo {
            bucket: Bucket::connect(url, options)?,
        })
    }
}

impl Repository for S3Repo {
    fn location(&self) -> String {
        self.bucket.url.to_string()
    }

    fn list(&self) -> Result<Vec<Listed>, RepoError> {
        let mut out = Vec::new();
        for name in self.bucket.children()? {
            out.push(match self.bucket.manifest(&name)? {
                Some(m) => Listed {
                    name,
                    complete: true,
                    validity_point: m.image.validity_point.clone(),
                    kind: m.image.kind.clone(),
                    bytes: m.image.totals.bytes,
                    stored_bytes: m.stored_bytes(),
                    reason: None,
                },
                // A binlog archive (`binlog-archive --upload`) is no image.
                None if crate::binlog_archive::remote::read(&self.bucket, &name)?.is_some() => {
                    continue;
                }
                None => Listed {
                    name,
                    complete: false,
                    validity_point: String::new(),
                    kind: String::new(),
                    bytes: 0,
                    stored_bytes: 0,
                    reason: Some("a partial upload (no repository manifest)".into()),
                },
            });
        }
        out.sort_by(|a, b| a.validity_point.cmp(&b.validity_point));
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<(), RepoError> {
        let b = &self.bucket;
        b.delete(&b.key(&join(name, REPO_MANIFEST)))?;
        for (key, _) in b.list_all(name)? {
            b.delete(&key)?;
        }
        Ok(())
    }
}
