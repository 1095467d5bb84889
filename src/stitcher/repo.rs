//! Delivery storage. Exactly-once: the delivery row and its job are written in one
//! transaction, and the `(caller, delivery_id)` primary key settles duplicates, even
//! concurrent ones (no read-then-write).

use diesel::prelude::*;

use super::model::DeliveryRow;
use crate::db::replay::{write_group, Placed, ReplayRow};
use crate::db::schema::webhook_deliveries;
use crate::db::{now_millis, on_backend, DbConnection};
use crate::error::StoreError;
use crate::jobs::model::NewJob;
use crate::jobs::row::JobRow;
use crate::jobs::{repo as jobs_repo, JobId};

/// Store a delivery and create its job; with a delivery id seen before, return that
/// delivery's job and `true` (duplicate) and create nothing. With `same_body_only` (the
/// id is the caller's own `Idempotency-Key`), a repeat whose body differs from the
/// first is a conflict.
pub fn ingest(
    conn: &mut DbConnection,
    caller: &str,
    delivery_id: &str,
    payload: &str,
    job: &NewJob,
    same_body_only: bool,
) -> Result<(JobRow, bool), StoreError> {
    let now = now_millis();
    let row = jobs_repo::new_row(job, caller, None, now);
    let delivery = DeliveryRow {
        caller: caller.to_owned(),
        delivery_id: delivery_id.to_owned(),
        received_at: now,
        payload: payload.to_owned(),
        job_id: row.id.clone(),
    };
    let r = conn.transaction(|conn| {
        on_backend!(conn, |c| diesel::insert_into(webhook_deliveries::table)
            .values(&delivery)
            .execute(c))?;
        jobs_repo::insert(conn, &row)
    });
    match r {
        Ok(()) => Ok((row, false)),
        Err(e) if e.is_unique_violation() => {
            delivered_before(conn, caller, delivery_id, payload, same_body_only)
        }
        Err(e) => Err(e),
    }
}

/// The job of a delivery stored before (`true`: a duplicate); a conflict when the id is
/// the caller's own key (`same_body_only`) and the first body differs.
fn delivered_before(
    conn: &mut DbConnection,
    caller: &str,
    delivery_id: &str,
    payload: &str,
    same_body_only: bool,
) -> Result<(JobRow, bool), StoreError> {
    let first: DeliveryRow = webhook_deliveries::table
        .find((caller, delivery_id))
        .select(DeliveryRow::as_select())
        .first(conn)?;
    if same_body_only && first.payload != payload {
        return Err(StoreError::Conflict(
            "Idempotency-Key was used before with a different body".into(),
        ));
    }
    let id = JobId::parse(&first.job_id, "jobId")
        .map_err(|e| StoreError::Internal(format!("bad job id in delivery: {e}")))?;
    Ok((jobs_repo::find(conn, &id)?, true))
}

/// One delivery of a group ([`ingest_group`]): what [`ingest`] takes, and the request's
/// deferred replay record (`db::replay::Deferred`; a delivery signed with a caller
/// scheme has one, a Standard Webhooks one has none).
#[derive(Debug, Clone)]
pub struct Ingest {
    pub caller: String,
    pub delivery_id: String,
    pub payload: String,
    pub job: NewJob,
    pub same_body_only: bool,
    pub record: Option<ReplayRow>,
}

impl Ingest {
    /// This delivery on its own: [`ingest`].
    pub fn alone(&self, conn: &mut DbConnection) -> Ingested {
        ingest(
            conn,
            &self.caller,
            &self.delivery_id,
            &self.payload,
            &self.job,
            self.same_body_only,
        )
    }
}

/// A delivery's answer in a group: its job and whether it is a duplicate, or its own
/// error.
pub type Ingested = Result<(JobRow, bool), StoreError>;

/// Several deliveries with one commit, the delivery log's batch (`stitcher::ingest`);
/// per delivery, in order, what [`ingest`] would answer for it alone. The records and
/// the fallback to one savepoint per delivery are `db::replay::write_group`'s.
pub fn ingest_group(
    conn: &mut DbConnection,
    group: Vec<Ingest>,
) -> Result<Vec<Ingested>, StoreError> {
    write_group(
        conn,
        &group,
        |d| d.record.as_ref(),
        ingest_together,
        |conn, d| d.alone(conn),
    )
}

/// [`ingest_group`]'s deliveries in few statements: each delivery row (skipped when
/// its id is stored already), in id order so that two groups with the same ids wait
/// for each other instead of deadlocking; then the new deliveries' jobs with
/// multi-row inserts; then the duplicates' first jobs (after the inserts, so a
/// delivery repeated within the group finds the job of its first).
fn ingest_together(
    conn: &mut DbConnection,
    mut todo: Vec<(usize, &Ingest)>,
) -> Result<Placed<(JobRow, bool)>, StoreError> {
    let now = now_millis();
    todo.sort_by(|a, b| {
        (a.1.caller.as_str(), a.1.delivery_id.as_str())
            .cmp(&(b.1.caller.as_str(), b.1.delivery_id.as_str()))
    });
    let (mut fresh, mut rows, mut repeats) = (Vec::new(), Vec::new(), Vec::new());
    for (i, d) in todo {
        let row = jobs_repo::new_row(&d.job, &d.caller, None, now);
        let delivery = DeliveryRow {
            caller: d.caller.clone(),
            delivery_id: d.delivery_id.clone(),
            received_at: now,
            payload: d.payload.clone(),
            job_id: row.id.clone(),
        };
        let inserted = match &mut *conn {
            DbConnection::Postgresql(pg) => diesel::insert_into(webhook_deliveries::table)
                .values(&delivery)
                .on_conflict_do_nothing()
                .execute(pg)?,
            DbConnection::Sqlite(lite) => diesel::insert_or_ignore_into(webhook_deliveries::table)
                .values(&delivery)
                .execute(lite)?,
        };
        if inserted == 1 {
            fresh.push(i);
            rows.push(row);
        } else {
            repeats.push((i, d));
        }
    }
    jobs_repo::insert_many(conn, &rows)?;
    let mut answers: Placed<(JobRow, bool)> = fresh
        .into_iter()
        .zip(rows)
        .map(|(i, row)| (i, Ok((row, false))))
        .collect();
    for (i, d) in repeats {
        let first = delivered_before(
            conn,
            &d.caller,
            &d.delivery_id,
            &d.payload,
            d.same_body_only,
        );
        // A conflict wrote nothing; any other error fails the group (its transaction
        // is aborted on PostgreSQL).
        answers.push((
            i,
            match first {
                Err(StoreError::Conflict(m)) => Err(StoreError::Conflict(m)),
                r => Ok(r?),
            },
        ));
    }
    Ok(answers)
}
