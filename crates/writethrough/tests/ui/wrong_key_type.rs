use serde::{Deserialize, Serialize};
use writethrough::{Entity, Handle};

#[derive(Entity, Serialize, Deserialize)]
struct User {
    id: i64,
    name: String,
}

async fn lookup(users: Handle<User>) {
    let _ = users.get("42").await;
}

fn main() {}
