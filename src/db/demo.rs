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
