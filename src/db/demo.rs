//! Demo data for `pgrelay serve` on a private database: one project with
//! two members, so the demo page has someone to chat with. Never run
//! against a database the user brought (`DATABASE_URL`).

use tokio_postgres::Client;

/// The seeded project.
pub const DEMO_PROJECT: &str = "demo";
/// The seeded users, both members of [`DEMO_PROJECT`].
pub const DEMO_USERS: [&str; 2] = ["alice", "bob"];

/// Creates the demo project and its members if they are missing; safe to
/// run on every start.
pub async fn seed(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO chat.projects (id, name) VALUES ($1, 'Demo project') ON CONFLICT DO NOTHING",
        &[&DEMO_PROJECT],
    )
    .await?;
    for (i, user) in DEMO_USERS.iter().enumerate() {
        let role = if i == 0 { "owner" } else { "member" };
        tx.execute(
            "INSERT INTO chat.project_members (project_id, user_id, role) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
            &[&DEMO_PROJECT, user, &role],
        )
        .await?;
    }
    tx.commit().await
}

/// The file in a private data directory that keeps the demo's token
/// secret, so tokens printed at one start (and pages opened with them)
/// still work after a restart on the same data.
pub const SECRET_FILE: &str = "pgrelay-demo-jwt-secret";

/// The demo mode's token secret: kept in `data_dir` when there is one (made
/// there on first use, readable by its owner only), else new at each start.
pub fn signing_secret(data_dir: Option<&std::path::Path>) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let Some(dir) = data_dir else {
        return Ok(random_secret());
    };
    let path = dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(secret) if secret.trim().len() >= 32 => return Ok(secret.trim().to_string()),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} holds no usable secret; remove it to make a new one",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let secret = random_secret();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    // The data directory belongs to the server's user (`postgres` when we
    // run as root): so does the file, so backups of it can read it.
    let owner = std::fs::metadata(dir)?;
    if owner.uid() != nix::unistd::getuid().as_raw() {
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid()))?;
    }
    Ok(secret)
}

/// 32 random bytes as hex.
fn random_secret() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_secret_is_kept_with_the_data_and_only_its_owner_reads_it() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let first = signing_secret(Some(dir.path())).expect("a new secret");
        let again = signing_secret(Some(dir.path())).expect("the kept secret");
        assert_eq!(first, again);
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
            .expect("the secret file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let none_a = signing_secret(None).expect("a secret");
        let none_b = signing_secret(None).expect("a secret");
        assert_ne!(
            none_a, none_b,
            "without a data directory each start has its own"
        );
    }

    #[test]
    fn a_damaged_secret_file_is_an_error_not_a_new_secret() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join(SECRET_FILE), "short").expect("writing");
        let err = signing_secret(Some(dir.path())).expect_err("refused");
        assert!(err.to_string().contains(SECRET_FILE), "{err}");
    }
}
