//! `coordinator caller add|list|disable`.

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::common::{cell_time, json_time, print_json, print_table, store_error};
use super::common::{OutputArgs, StoreArgs};
use crate::auth::credentials;
use crate::auth::model::CallerRow;
use crate::auth::Scope;

/// A scope list as given on the command line (`jobs:read,jobs:update` or `all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scopes(pub Vec<Scope>);

/// Clap value parser for [`Scopes`]; an empty list is refused.
pub fn parse_scopes(text: &str) -> Result<Scopes, String> {
    let list = Scope::parse_list(text)?;
    if list.is_empty() {
        let all: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
        return Err(format!("name at least one scope: {} or all", all.join(",")));
    }
    Ok(Scopes(list))
}

#[derive(Debug, Subcommand)]
pub enum CallerCommand {
    /// Add a caller (a named internal service) with its scopes.
    Add(AddArgs),
    /// List callers with their scopes.
    List(ListArgs),
    /// Disable a caller: every credential it holds stops working.
    Disable(DisableArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The caller's name: ^[a-z][a-z0-9_-]{0,31}$.
    pub name: String,
    /// Comma-separated scopes (jobs:create, jobs:update, jobs:read, health:read,
    /// stitcher:webhook, stitcher:dispatch, admin), or `all`.
    #[arg(long, value_parser = parse_scopes)]
    pub scopes: Scopes,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct DisableArgs {
    /// The caller's name.
    pub name: String,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl CallerCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            CallerCommand::Add(a) => add(a),
            CallerCommand::List(a) => list(a),
            CallerCommand::Disable(a) => disable(a),
        }
    }
}

fn caller_json(c: &CallerRow) -> Value {
    json!({
        "name": c.name,
        "scopes": c.scope_list(),
        "createdAt": json_time(Some(c.created_at)),
        "disabledAt": json_time(c.disabled_at),
    })
}

pub fn add(args: AddArgs) -> anyhow::Result<()> {
    let db = args.store.open()?;
    let row = credentials::add_caller(&db, &args.name, &args.scopes.0)
        .map_err(|e| store_error(e, format!("caller `{}`", args.name)))?;
    if args.output.json {
        return print_json(&caller_json(&row));
    }
    eprintln!(
        "added caller `{}` with scopes {}",
        row.name,
        Scope::join(&args.scopes.0)
    );
    outln!("COORDINATOR_CALLER={}", row.name)?;
    Ok(())
}

pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let db = args.store.open()?;
    let rows = credentials::list_callers(&db).map_err(|e| store_error(e, "callers"))?;
    if args.output.json {
        return print_json(&Value::Array(rows.iter().map(caller_json).collect()));
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                if c.disabled_at.is_some() {
                    "disabled".to_owned()
                } else {
                    "active".to_owned()
                },
                c.scopes.clone(),
                cell_time(Some(c.created_at)),
                cell_time(c.disabled_at),
            ]
        })
        .collect();
    print_table(&["NAME", "STATUS", "SCOPES", "CREATED", "DISABLED"], &table)
}

pub fn disable(args: DisableArgs) -> anyhow::Result<()> {
    let db = args.store.open()?;
    credentials::disable_caller(&db, &args.name)
        .map_err(|e| store_error(e, format!("caller `{}`", args.name)))?;
    let row = credentials::find_caller(&db, &args.name)
        .map_err(|e| store_error(e, format!("caller `{}`", args.name)))?;
    if args.output.json {
        return print_json(&row.as_ref().map_or(Value::Null, caller_json));
    }
    eprintln!(
        "disabled caller `{}`: its requests are refused from now on",
        args.name
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_lists() {
        assert_eq!(
            parse_scopes("jobs:read,jobs:update"),
            Ok(Scopes(vec![Scope::JobsUpdate, Scope::JobsRead]))
        );
        assert_eq!(parse_scopes("all"), Ok(Scopes(Scope::ALL.to_vec())));
        assert!(parse_scopes("").is_err());
        assert!(parse_scopes(",").is_err());
        assert!(parse_scopes("jobs:write").is_err());
    }
}
