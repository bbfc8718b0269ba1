//! `aerekos token …`: API tokens and their roles (`/api/v1/tokens`; an
//! admin token's business).

use std::io::Write;

use clap::{Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::{rows, s, CliError, Client, Printer};

/// What a token may do (the conductor's role table is in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Everything, token management and remote exec included.
    Admin,
    /// Everything but the admin-only routes (tokens, the registration
    /// token, the password, remote exec and shells, agent releases).
    Operator,
    /// Reads only (`GET`), but not the admin-only ones.
    Viewer,
}

impl Role {
    /// The API's name of the role.
    fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

/// `aerekos token …`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create an API token; prints it (shown once).
    Create {
        /// A name for people (1..=64 characters), shown in the audit.
        name: String,
        /// What it may do.
        #[arg(long, value_enum, default_value_t = Role::Admin)]
        role: Role,
    },
    /// List API tokens with their role (never the tokens themselves).
    List,
    /// Delete an API token (it stops working at once).
    Delete {
        /// Token id (`t-…`, from `token list`).
        id: String,
    },
}

fn opt_num(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

fn tokens_table(v: &Value) -> String {
    let mut out = String::from("ID\tNAME\tROLE\tCREATED_MS\n");
    for t in rows(v, "tokens") {
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            s(&t, "id"),
            s(&t, "name"),
            s(&t, "role"),
            opt_num(&t, "created_ms"),
        ));
    }
    out
}

/// Runs one `token` command.
pub(crate) fn run(
    client: &Client,
    cmd: TokenCmd,
    out: &mut dyn Write,
    print: &Printer<'_>,
) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create { name, role } => {
            let v = client.send(
                "POST",
                "/tokens",
                &json!({"name": name, "role": role.as_str()}),
            )?;
            print(out, &v, &|v| s(v, "token").to_string())?;
        }
        TokenCmd::List => {
            let v = client.get("/tokens")?;
            print(out, &v, &tokens_table)?;
        }
        TokenCmd::Delete { id } => {
            let v = client.delete(&format!("/tokens/{id}"))?;
            print(out, &v, &|_| format!("token {id} deleted"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_defaults_to_admin_and_is_checked() {
        use clap::Parser;
        let role = |args: &[&str]| match crate::Cli::try_parse_from(args).map(|c| c.command) {
            Ok(crate::Cmd::Token(TokenCmd::Create { role, .. })) => Some(role.as_str()),
            _ => None,
        };
        assert_eq!(role(&["aerekos", "token", "create", "ci"]), Some("admin"));
        assert_eq!(
            role(&["aerekos", "token", "create", "ci", "--role", "operator"]),
            Some("operator")
        );
        assert_eq!(
            role(&["aerekos", "token", "create", "ci", "--role", "viewer"]),
            Some("viewer")
        );
        assert_eq!(
            role(&["aerekos", "token", "create", "ci", "--role", "root"]),
            None
        );
    }

    #[test]
    fn table_lists_roles() {
        let v = json!({"tokens": [
            {"id": "t-1", "name": "ci", "role": "operator", "created_ms": 5},
            {"id": "t-2", "name": "old", "created_ms": 6},
        ]});
        assert_eq!(
            tokens_table(&v),
            "ID\tNAME\tROLE\tCREATED_MS\nt-1\tci\toperator\t5\nt-2\told\t-\t6\n"
        );
    }
}
