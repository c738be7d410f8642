//! A real S3-compatible server for the tests: `moto` in server mode on a free loopback
//! port, with authentication on (an IAM user and key made through its own API), stopped
//! by its own pid when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "hb-test";

pub struct Moto {
    child: Child,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    log: tempfile::NamedTempFile,
}

impl Moto {
    /// Starts moto with the bucket [`BUCKET`]; any key is accepted.
    pub fn start() -> Moto {
        Self::launch(false)
    }

    /// Starts moto with authentication on: only the key of a user made through its IAM
    /// API is accepted. (moto 5.2 then also refuses correctly signed requests whose query
    /// holds a '/', such as a listing with a delimiter: use it for the credential checks.)
    pub fn start_with_auth() -> Moto {
        Self::launch(true)
    }

    fn launch(auth: bool) -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new("python3");
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ]);
        if auth {
            // The first three requests (making the user, its key and its policy) go
            // unauthenticated; every later one must be signed with a real key.
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", "3");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start moto (python3 -m pip install 'moto[server]')");
        let mut moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key: String::new(),
            secret_key: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto did not start: {}",
                moto.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = if !auth {
            "test-key test-secret".to_string()
        } else {
            moto.python(
                r#"
iam = boto3.client("iam", aws_access_key_id="x", aws_secret_access_key="y", **kw)
iam.create_user(UserName="hotbackup")
k = iam.create_access_key(UserName="hotbackup")["AccessKey"]
iam.put_user_policy(UserName="hotbackup", PolicyName="all",
    PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}')
print(k["AccessKeyId"], k["SecretAccessKey"])
"#,
            )
        };
        let mut words = out.split_whitespace();
        moto.access_key = words.next().expect("an access key").to_string();
        moto.secret_key = words.next().expect("a secret key").to_string();
        moto.python(&format!("s3().create_bucket(Bucket={BUCKET:?})"));
        moto
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Runs Python with `boto3`, `kw` (endpoint, region) and `s3()` (a client with the
    /// user's key) defined; returns its stdout.
    pub fn python(&self, code: &str) -> String {
        let prelude = format!(
            "import boto3\nkw = dict(endpoint_url={:?}, region_name='us-east-1')\n\
             def s3(): return boto3.client('s3', aws_access_key_id={:?}, aws_secret_access_key={:?}, **kw)\n",
            self.endpoint, self.access_key, self.secret_key
        );
        let out = Command::new("python3")
            .args(["-c", &format!("{prelude}{code}")])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Lets anyone read the bucket's objects, so that [`Moto::get`] may.
    pub fn allow_anonymous_reads(&self) {
        self.python(&format!(
            "import json\ns3().put_bucket_policy(Bucket={BUCKET:?}, Policy=json.dumps({{'Version': '2012-10-17', \
             'Statement': [{{'Effect': 'Allow', 'Principal': '*', 'Action': 's3:GetObject', 'Resource': 'arn:aws:s3:::{BUCKET}/*'}}]}}))"
        ));
    }

    /// The object `key` of the bucket (None: not there), by a plain unsigned GET (after
    /// [`Moto::allow_anonymous_reads`]): far quicker than starting Python, for polling.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        use std::io::{Read, Write};
        let host = self.endpoint.trim_start_matches("http://");
        let mut conn = TcpStream::connect(host).unwrap();
        write!(
            conn,
            "GET /{BUCKET}/{key} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).unwrap();
        let end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&answer[..end]);
        match head.split_whitespace().nth(1) {
            Some("200") => Some(answer[end + 4..].to_vec()),
            Some("404") => None,
            other => panic!("GET {key}: {other:?}: {head}"),
        }
    }

    /// Every key in the bucket under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.python(&format!(
            "p = s3().get_paginator('list_objects_v2')\n\
             for page in p.paginate(Bucket={BUCKET:?}, Prefix={prefix:?}):\n\
             \x20   for o in page.get('Contents', []): print(o['Key'])"
        ))
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// `hotbackup ARGS` with this server's endpoint and credentials in the environment.
    pub fn hotbackup(&self, args: &[&str]) -> Output {
        self.hotbackup_with(args, &[])
    }

    pub fn hotbackup_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    /// `hotbackup ARGS` with this server's endpoint and credentials, to run as it needs.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(super::hotbackup_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .env("AWS_REGION", "us-east-1")
            // No credential file of the machine's may stand in for a missing variable.
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env("AWS_CONFIG_FILE", "/nonexistent");
        cmd
    }

    pub fn url(&self, rest: &str) -> String {
        format!("s3://{BUCKET}/{rest}")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // SAFETY: a signal to the child this guard started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a 0600 key file of 32 random bytes.
pub fn key_file(dir: &Path) -> std::path::PathBuf {
    use std::io::Read;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut key)
        .unwrap();
    let path = dir.join("backup.key");
    std::fs::write(&path, key).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

/// A loopback TCP proxy to the server that cuts every connection once `cut_after`
/// bytes went towards the server, and then refuses all new ones: the network going
/// away in the middle of an upload. It can also be cut and mended at will
/// ([`CutProxy::set_down`]), and cut only the connections whose requests name a key
/// ([`CutProxy::refuse`]): a bucket that fails one object.
pub struct CutProxy {
    pub endpoint: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    refused: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    port: u16,
}

impl CutProxy {
    pub fn start(server_endpoint: &str, cut_after: u64) -> CutProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
        use std::sync::{Arc, Mutex};
        let upstream = server_endpoint.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let refused: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let (stop2, cut2, refused2) = (stop.clone(), cut.clone(), refused.clone());
        std::thread::spawn(move || {
            let (cut, refused) = (cut2, refused2);
            for client in listener.incoming() {
                if stop2.load(SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if cut.load(SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (sent, cut, refused) = (sent.clone(), cut.clone(), refused.clone());
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                // server → client: plain copy until either side closes.
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &s2, &mut &c2);
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                });
                // client → server: counted; past the limit everything is cut.
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = [0u8; 16 << 10];
                    loop {
                        let n = match (&client).read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if sent.fetch_add(n as u64, SeqCst) + n as u64 > cut_after {
                            cut.store(true, SeqCst);
                        }
                        let refuse =
                            refused.lock().unwrap().as_ref().is_some_and(|r| {
                                buf[..n].windows(r.len()).any(|w| w == r.as_bytes())
                            });
                        if refuse || cut.load(SeqCst) || (&server).write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = server.shutdown(std::net::Shutdown::Both);
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CutProxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            stop,
            cut,
            refused,
            port,
        }
    }

    /// Down: every connection is cut and new ones refused; up: all pass again.
    pub fn set_down(&self, down: bool) {
        self.cut.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// Cuts every connection whose request holds `text` (a key), until called with None.
    pub fn refuse(&self, text: Option<&str>) {
        *self.refused.lock().unwrap() = text.map(str::to_string);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
