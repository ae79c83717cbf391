//! The AWS CLI's shared files: a profile's keys, region and endpoint for `s3://` URLs.
//!
//! object_store reads the environment only. A researcher set up with `aws configure` has the
//! keys in `~/.aws/credentials` and the region in `~/.aws/config`, chosen by `AWS_PROFILE`
//! (`default` without it). This reads the same files the same way: `AWS_SHARED_CREDENTIALS_FILE`
//! and `AWS_CONFIG_FILE` name other files; the credentials file's `[NAME]` and the config file's
//! `[profile NAME]` (`[default]`) sections are merged, the credentials file winning; a variable
//! set in the environment wins over the files, as with the AWS CLI. Profiles that get their
//! keys by running something (`credential_process`, SSO, a role assumed from another profile)
//! are refused with the command that exports their keys.

use std::path::PathBuf;

/// The keys this reads from a profile, and the object_store option each sets.
const KEYS: [(&str, &str); 7] = [
    ("aws_access_key_id", "aws_access_key_id"),
    ("aws_secret_access_key", "aws_secret_access_key"),
    ("aws_session_token", "aws_session_token"),
    ("region", "aws_region"),
    ("endpoint_url", "aws_endpoint_url"),
    ("role_arn", "aws_role_arn"),
    ("web_identity_token_file", "aws_web_identity_token_file"),
];

/// Keys of profiles whose credentials come from running something icefm does not run.
const RUN_KEYS: [&str; 5] = [
    "credential_process",
    "sso_session",
    "sso_start_url",
    "source_profile",
    "credential_source",
];

/// The sections of an INI file as the AWS CLI writes it: `[name]` headers, `key = value` lines
/// (keys lower-cased), `#` and `;` comments; indented lines (a nested `s3 =` block) are skipped.
fn sections(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in text.lines() {
        let line = line.trim_start_matches('\u{feff}');
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            out.push((name.trim().to_string(), Vec::new()));
        } else if let (Some((k, v)), Some((_, keys))) = (line.split_once('='), out.last_mut()) {
            keys.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    out
}

/// The keys of section `name` of `text` in file order (a section named twice adds up), `None`
/// when there is no such section.
fn section(text: &str, name: &str) -> Option<Vec<(String, String)>> {
    let mut found = None;
    for (n, keys) in sections(text) {
        if n == name {
            found.get_or_insert_with(Vec::new).extend(keys);
        }
    }
    found
}

/// The shared files as read: each one's path (for messages) and text, `None` when absent.
pub(super) struct Files {
    pub credentials: (PathBuf, Option<String>),
    pub config: (PathBuf, Option<String>),
}

impl Files {
    /// The files the environment names, or `~/.aws/credentials` and `~/.aws/config`.
    pub fn read(env: &[(String, String)]) -> Result<Self, String> {
        let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let home = var("HOME").map(PathBuf::from);
        let path = |k: &str, file: &str| {
            var(k)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(file)))
        };
        let load = |p: Option<PathBuf>| -> Result<(PathBuf, Option<String>), String> {
            let Some(p) = p else {
                return Ok((PathBuf::from("~/.aws"), None));
            };
            match std::fs::read_to_string(&p) {
                Ok(text) => Ok((p, Some(text))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((p, None)),
                Err(e) => Err(format!("{}: {e}", p.display())),
            }
        };
        Ok(Self {
            credentials: load(path("AWS_SHARED_CREDENTIALS_FILE", "credentials"))?,
            config: load(path("AWS_CONFIG_FILE", "config"))?,
        })
    }
}

/// The object_store options that profile of `files` sets which `env` does not: the profile is
/// `AWS_PROFILE` (`default` without it). Empty when there is no such profile and none was
/// asked for; an error for an unknown profile that was asked for, and for one whose keys come
/// from running something.
pub(super) fn options(
    env: &[(String, String)],
    files: &Files,
) -> Result<Vec<(String, String)>, String> {
    let var = |k: &str| {
        env.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let asked = var("AWS_PROFILE");
    let name = asked.unwrap_or("default");
    let config_section = if name == "default" {
        "default".to_string()
    } else {
        format!("profile {name}")
    };
    let from_config = files
        .config
        .1
        .as_deref()
        .and_then(|t| section(t, &config_section));
    let from_credentials = files
        .credentials
        .1
        .as_deref()
        .and_then(|t| section(t, name));
    if from_config.is_none() && from_credentials.is_none() {
        return match asked {
            Some(_) => Err(format!(
                "AWS_PROFILE={name}: no such profile in {} or {}",
                files.credentials.0.display(),
                files.config.0.display()
            )),
            None => Ok(Vec::new()),
        };
    }
    let mut keys = from_config.unwrap_or_default();
    keys.extend(from_credentials.unwrap_or_default());
    let get = |k: &str| {
        keys.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };

    // The environment's own keys win, each group whole (a key of one account is never signed
    // with another's secret).
    let env_has_keys = var("AWS_ACCESS_KEY_ID").is_some();
    let env_has = |profile_key: &str| match profile_key {
        "aws_access_key_id" | "aws_secret_access_key" | "aws_session_token" => env_has_keys,
        "region" => var("AWS_REGION").is_some() || var("AWS_DEFAULT_REGION").is_some(),
        "endpoint_url" => var("AWS_ENDPOINT").is_some() || var("AWS_ENDPOINT_URL").is_some(),
        "role_arn" | "web_identity_token_file" => {
            env_has_keys || var("AWS_WEB_IDENTITY_TOKEN_FILE").is_some()
        }
        _ => false,
    };
    let has_keys = get("aws_access_key_id").is_some() || get("web_identity_token_file").is_some();
    if !has_keys
        && !env_has_keys
        && let Some(run) = RUN_KEYS.iter().find(|k| get(k).is_some())
    {
        return Err(format!(
            "AWS profile `{name}` gets its keys through `{run}`, which icefm does not run: \
             export them first, e.g. eval \"$(aws configure export-credentials --profile {name} \
             --format env)\""
        ));
    }
    if !env_has_keys && get("aws_access_key_id").is_some() && get("aws_secret_access_key").is_none()
    {
        return Err(format!(
            "AWS profile `{name}` has aws_access_key_id but no aws_secret_access_key ({})",
            files.credentials.0.display()
        ));
    }
    Ok(KEYS
        .iter()
        .filter(|(k, _)| !env_has(k))
        .filter_map(|(k, option)| Some((option.to_string(), get(k)?.to_string())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn files(credentials: Option<&str>, config: Option<&str>) -> Files {
        Files {
            credentials: (
                "/h/.aws/credentials".into(),
                credentials.map(str::to_string),
            ),
            config: ("/h/.aws/config".into(), config.map(str::to_string)),
        }
    }

    const CREDENTIALS: &str = "\u{feff}# written by aws configure\n\
        [default]\n\
        aws_access_key_id = AKIADEFAULT\n\
        aws_secret_access_key = secretdefault\n\
        \n\
        [lab]\n\
        AWS_ACCESS_KEY_ID=AKIALAB\n\
        aws_secret_access_key = secret=lab\n\
        aws_session_token = tok\n";

    const CONFIG: &str = "[default]\n\
        region = eu-north-1\n\
        \n\
        ; the lab's MinIO\n\
        [profile lab]\n\
        region = us-east-1\n\
        endpoint_url = http://minio.lab:9000\n\
        s3 =\n  addressing_style = path\n\
        \n\
        [profile sso]\n\
        sso_session = corp\n\
        region = eu-west-1\n\
        \n\
        [profile eks]\n\
        role_arn = arn:aws:iam::1:role/r\n\
        web_identity_token_file = /var/run/token\n";

    fn got(
        e: &[(&str, &str)],
        c: Option<&str>,
        f: Option<&str>,
    ) -> Result<Vec<(String, String)>, String> {
        options(&env(e), &files(c, f))
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        env(p)
    }

    #[test]
    fn the_default_profile_and_a_named_one_are_read_as_the_aws_cli_reads_them() {
        assert_eq!(
            got(&[], Some(CREDENTIALS), Some(CONFIG)).unwrap(),
            pairs(&[
                ("aws_access_key_id", "AKIADEFAULT"),
                ("aws_secret_access_key", "secretdefault"),
                ("aws_region", "eu-north-1"),
            ])
        );
        // Keys are case-blind, values keep everything after the first '=', and the nested
        // `s3 =` block is skipped.
        assert_eq!(
            got(&[("AWS_PROFILE", "lab")], Some(CREDENTIALS), Some(CONFIG)).unwrap(),
            pairs(&[
                ("aws_access_key_id", "AKIALAB"),
                ("aws_secret_access_key", "secret=lab"),
                ("aws_session_token", "tok"),
                ("aws_region", "us-east-1"),
                ("aws_endpoint_url", "http://minio.lab:9000"),
            ])
        );
        // A web-identity profile passes its role and token file on.
        assert_eq!(
            got(&[("AWS_PROFILE", "eks")], None, Some(CONFIG)).unwrap(),
            pairs(&[
                ("aws_role_arn", "arn:aws:iam::1:role/r"),
                ("aws_web_identity_token_file", "/var/run/token"),
            ])
        );
    }

    #[test]
    fn the_environment_wins_group_by_group() {
        let e = [
            ("AWS_PROFILE", "lab"),
            ("AWS_ACCESS_KEY_ID", "AKIAENV"),
            ("AWS_DEFAULT_REGION", "ap-south-1"),
        ];
        // No key, secret or token of the profile with the environment's key; its endpoint stays.
        assert_eq!(
            got(&e, Some(CREDENTIALS), Some(CONFIG)).unwrap(),
            pairs(&[("aws_endpoint_url", "http://minio.lab:9000")])
        );
        let e = [("AWS_PROFILE", "lab"), ("AWS_ENDPOINT", "https://s3.lab")];
        let o = got(&e, Some(CREDENTIALS), Some(CONFIG)).unwrap();
        assert!(o.iter().all(|(k, _)| k != "aws_endpoint_url"), "{o:?}");
        assert!(o.iter().any(|(k, v)| k == "aws_region" && v == "us-east-1"));
    }

    #[test]
    fn missing_files_and_profiles_and_unrunnable_ones() {
        // Nothing set up: nothing added (instance profiles and the like stay object_store's).
        assert_eq!(got(&[], None, None).unwrap(), Vec::new());
        assert_eq!(
            got(&[], None, Some("[profile x]\nregion = a\n")).unwrap(),
            Vec::new()
        );
        // A profile asked for by name must exist.
        let e = got(&[("AWS_PROFILE", "nope")], Some(CREDENTIALS), Some(CONFIG)).unwrap_err();
        assert!(
            e.contains(
                "AWS_PROFILE=nope: no such profile in /h/.aws/credentials or /h/.aws/config"
            ),
            "{e}"
        );
        // SSO and the like say how to export their keys, unless the environment has keys.
        let e = got(&[("AWS_PROFILE", "sso")], Some(CREDENTIALS), Some(CONFIG)).unwrap_err();
        assert!(
            e.contains("`sso_session`") && e.contains("export-credentials --profile sso"),
            "{e}"
        );
        let with_keys = [("AWS_PROFILE", "sso"), ("AWS_ACCESS_KEY_ID", "AKIAENV")];
        assert_eq!(
            got(&with_keys, Some(CREDENTIALS), Some(CONFIG)).unwrap(),
            pairs(&[("aws_region", "eu-west-1")])
        );
        // A key without its secret is an error, not half a credential, unless the
        // environment's keys are used instead.
        let half = Some("[default]\naws_access_key_id = A\n");
        let e = got(&[], half, None).unwrap_err();
        assert!(e.contains("no aws_secret_access_key"), "{e}");
        assert_eq!(
            got(&[("AWS_ACCESS_KEY_ID", "AKIAENV")], half, None).unwrap(),
            Vec::new()
        );
    }

    #[test]
    fn the_files_are_found_where_the_environment_says() {
        let dir = tempfile::tempdir().unwrap();
        let aws = dir.path().join(".aws");
        std::fs::create_dir(&aws).unwrap();
        std::fs::write(aws.join("credentials"), CREDENTIALS).unwrap();
        let home = dir.path().to_str().unwrap();
        let f = Files::read(&env(&[("HOME", home)])).unwrap();
        assert_eq!(f.credentials.1.as_deref(), Some(CREDENTIALS));
        assert_eq!(f.config, (aws.join("config"), None));
        let other = dir.path().join("cfg");
        std::fs::write(&other, CONFIG).unwrap();
        let f = Files::read(&env(&[
            ("HOME", home),
            ("AWS_CONFIG_FILE", other.to_str().unwrap()),
        ]))
        .unwrap();
        assert_eq!(f.config.1.as_deref(), Some(CONFIG));
    }
}
