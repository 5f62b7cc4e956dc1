//! Routing a run of changes: **match** under the index lock into an owned
//! [`Plan`], then **deliver** with no lock held; authorization (`authorize`)
//! decides each hit's [`Outcome`] between the two. Delivery is lossless and
//! paced by the read-ahead budget (see [`crate::flow`]).
//!
//! Matching visits each channel bound to the change's table once (bindings
//! are grouped by channel in the index), evaluates event and filters, and
//! records one [`Hit`] per channel and column variant with the ids of its
//! matching bindings. A change nobody is bound to is never parsed. Delivery
//! builds `data` once per column variant and one frame per distinct
//! `(variant, topic, ids, vsn, legacy)`, shared by every channel that needs it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use change_ingest::authz::{Cohort, TableAccess};
use change_ingest::Change;
use phoenix_channel::{encode_text_sized, Vsn};
use serde_json::value::RawValue;

use super::encode::{encode_data, encode_error, Event, Parsed};
use super::filter::{self, Kind};
use super::index::{Entry, Index};
use crate::registry::{ChannelHandle, Fanout, Outbound};

/// A plan stops taking changes once it holds this many hits, bounding the
/// memory of one routing step whatever the batch size and fan-out.
const HIT_BUDGET: usize = 65_536;

/// What happens to one hit (decided by `authorize`; nothing is delivered
/// until it says so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The event, with the columns the role may read.
    Deliver,
    /// Nothing (not visible to the subscriber).
    Skip,
    /// The event without rows, carrying this error (Realtime's 400/401).
    Error(&'static str),
    /// A `system` error on the channel (first failure of an episode).
    PolicyError(Arc<str>),
}

/// One channel's matching bindings for one change, for one column variant.
#[derive(Debug)]
pub(super) struct Hit {
    pub(super) chan: Arc<ChannelHandle>,
    pub(super) legacy: bool,
    /// The bindings' `select` (several bindings of one channel with different
    /// lists make several hits, each with its own ids).
    pub(super) select: Option<Arc<[String]>>,
    /// Range of [`Plan::ids`].
    ids: Range<usize>,
    /// Who the channel acts as.
    pub(super) cohort: Arc<Cohort>,
    pub(super) outcome: Outcome,
    /// The role's privileges when it may not read every column.
    pub(super) access: Option<Arc<TableAccess>>,
    /// UPDATE whose old row the subscriber could not see: `old_record`
    /// carries only the primary key.
    pub(super) old_pk_only: bool,
}

/// The matching bindings of a run of changes, owned, so the index lock can be
/// released before authorizing and delivering.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Per change of the run, in order: its range of `hits`.
    pub(super) changes: Vec<Range<usize>>,
    pub(super) hits: Vec<Hit>,
    ids: Vec<u32>,
    /// Row images parsed while matching (reused by encoding).
    parsed: Vec<Parsed>,
}

/// Matches changes from the start of `changes` until they run out or the
/// plan holds [`HIT_BUDGET`] hits; `plan.changes.len()` says how many it took
/// (at least one).
pub(super) fn match_changes(idx: &Index, changes: &[Change]) -> Plan {
    let mut plan = Plan::default();
    let mut scratch = Vec::new();
    for change in changes {
        let start = plan.hits.len();
        let mut parsed = Parsed::default();
        match_one(idx, change, &mut parsed, &mut plan, &mut scratch);
        plan.changes.push(start..plan.hits.len());
        plan.parsed.push(parsed);
        if plan.hits.len() >= HIT_BUDGET {
            break;
        }
    }
    plan
}

/// Adds the hits of one change to `plan`.
fn match_one(
    idx: &Index,
    change: &Change,
    parsed: &mut Parsed,
    plan: &mut Plan,
    scratch: &mut Vec<(u32, Option<Arc<[String]>>)>,
) {
    let exact = idx.group_of(&change.table);
    let wildcard = (!idx.wildcard.is_empty()).then_some(&idx.wildcard);
    if exact.is_none() && wildcard.is_none() {
        return; // nobody listens: never parsed, never encoded
    }
    // A channel with bindings in both groups is handled with its exact entry.
    if let Some(exact) = exact {
        for entry in &exact.entries {
            let also = wildcard.and_then(|w| w.get(entry.chan.id));
            collect(change, parsed, (entry, true), also, plan, scratch);
        }
    }
    if let Some(wildcard) = wildcard {
        for entry in &wildcard.entries {
            if exact.is_some_and(|e| e.contains(entry.chan.id)) {
                continue;
            }
            collect(change, parsed, (entry, false), None, plan, scratch);
        }
    }
}

/// One channel: its matching bindings, grouped by `select` into hits.
/// `(entry, exact)`: exact when `entry` is from the change's table group
/// (found by oid): its bindings' table names are not compared, they may lag
/// a rename the change already carries.
fn collect(
    change: &Change,
    parsed: &mut Parsed,
    (entry, exact): (&Entry, bool),
    also: Option<&Entry>,
    plan: &mut Plan,
    scratch: &mut Vec<(u32, Option<Arc<[String]>>)>,
) {
    scratch.clear();
    let bindings = entry.bindings.iter().map(|b| (b, exact)).chain(
        also.into_iter()
            .flat_map(|e| &e.bindings)
            .map(|b| (b, false)),
    );
    for (b, exact) in bindings {
        let wanted = if exact {
            b.wants_op(change.op)
        } else {
            b.wants(change.op, &change.table)
        };
        if !wanted {
            continue;
        }
        if !b.conditions.is_empty() {
            // A column dropped or renamed since the binding was made is not NULL:
            // the filter cannot hold (no phantom `is.null` matches).
            let columns = &change.table.columns;
            if !b
                .conditions
                .iter()
                .all(|c| columns.iter().any(|col| col.name == c.column))
            {
                continue;
            }
            let Some(row) = parsed.filtered_row(change) else {
                continue;
            };
            let kind = |name: &str| {
                change
                    .table
                    .columns
                    .iter()
                    .find(|col| col.name == name)
                    .map_or(Kind::Text, |col| filter::kind_of(&col.type_name))
            };
            if !filter::matches(&b.conditions, kind, row) {
                continue;
            }
        }
        scratch.push((b.id, b.select.clone()));
    }
    // Almost always one variant; several only when this channel's matching
    // bindings asked for different column lists.
    while let Some((_, select)) = scratch.first().cloned() {
        let start = plan.ids.len();
        scratch.retain(|(id, s)| {
            if *s != select {
                return true;
            }
            if !plan.ids[start..].contains(id) {
                plan.ids.push(*id);
            }
            false
        });
        plan.hits.push(Hit {
            chan: Arc::clone(&entry.chan),
            legacy: entry.legacy,
            select,
            ids: start..plan.ids.len(),
            cohort: Arc::clone(&entry.cohort),
            outcome: Outcome::Skip,
            access: None,
            old_pk_only: false,
        });
    }
}

/// Delivers a plan's hits, change by change, into the channels' paced
/// queues (lossless); before each change it waits while the read-ahead budget
/// is spent (see [`crate::flow`]). Returns the frames queued.
pub(super) async fn deliver(fanout: &Fanout, changes: &[Change], plan: &mut Plan) -> usize {
    let mut total = 0;
    for (i, change) in changes.iter().enumerate().take(plan.changes.len()) {
        let range = plan.changes[i].clone();
        if range.is_empty() {
            continue;
        }
        fanout.flow.room().await;
        let delivered = deliver_one(
            fanout,
            change,
            &mut plan.parsed[i],
            &plan.hits[range],
            &plan.ids,
        );
        if delivered > 0 {
            metrics::counter!(crate::metrics::CHANGES_DELIVERED).increment(delivered as u64);
            record_latency(&change.commit_timestamp);
        }
        total += delivered;
    }
    total
}

fn deliver_one(
    fanout: &Fanout,
    change: &Change,
    parsed: &mut Parsed,
    hits: &[Hit],
    ids: &[u32],
) -> usize {
    // data: once per variant (column list, role privileges, error), almost
    // always just one.
    type Variant<'a> = (VariantKey<'a>, Option<Box<RawValue>>);
    let mut datas: Vec<Variant<'_>> = Vec::new();
    // frames: once per distinct (variant, topic, ids, vsn, legacy).
    type FrameKey<'a> = (usize, &'a str, &'a [u32], Vsn, bool);
    let mut frames: HashMap<FrameKey<'_>, Option<Bytes>> = HashMap::new();
    let mut delivered = 0;
    for hit in hits {
        let key = match &hit.outcome {
            Outcome::Skip => continue,
            Outcome::PolicyError(message) => {
                super::system_in_order(fanout, &hit.chan, "postgres_changes", "error", message);
                continue;
            }
            Outcome::Deliver => VariantKey::Rows(
                hit.select.as_deref(),
                hit.access.as_ref().map(Arc::as_ptr),
                hit.old_pk_only,
            ),
            Outcome::Error(e) => VariantKey::Error(e),
        };
        let variant = match datas.iter().position(|(k, _)| *k == key) {
            Some(v) => v,
            None => {
                let data = match key {
                    VariantKey::Rows(select, _, old_pk_only) => {
                        encode_data(change, parsed, select, hit.access.as_deref(), old_pk_only)
                    }
                    VariantKey::Error(e) => encode_error(change, e),
                };
                datas.push((key, data));
                datas.len() - 1
            }
        };
        let Some(data) = datas[variant].1.as_deref() else {
            continue;
        };
        let (chan, legacy, ids) = (&hit.chan, hit.legacy, &ids[hit.ids.clone()]);
        let frame = frames
            .entry((variant, chan.topic.as_str(), ids, chan.vsn, legacy))
            .or_insert_with(|| {
                // Sized: the frame may wait in a paced queue, so it should
                // hold no spare capacity (a growing buffer keeps up to 2×).
                let (topic, event) = (&chan.topic, "postgres_changes");
                let encoded = if legacy {
                    let len = data.get().len();
                    encode_text_sized(chan.vsn, None, None, topic, event, data, len)
                } else {
                    let len = data.get().len() + 24 + 11 * ids.len();
                    let payload = Event { ids, data };
                    encode_text_sized(chan.vsn, None, None, topic, event, &payload, len)
                };
                encoded.ok()
            });
        if let Some(frame) = frame {
            delivered += usize::from(fanout.flow.offer(chan, Outbound::Text(frame.clone())));
        }
    }
    delivered
}

/// What makes two hits' `data` differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VariantKey<'a> {
    /// Rows narrowed to a `select` list and to a role's readable columns
    /// (the privileges' identity; `None` = every column), and whether the
    /// old row shows only its key.
    Rows(Option<&'a [String]>, Option<*const TableAccess>, bool),
    /// No rows, an error.
    Error(&'static str),
}

/// Commit (capture) time to enqueue, into the latency histogram.
fn record_latency(commit_timestamp: &str) {
    let Some(at) = filter::parse_time(commit_timestamp) else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i128)
        .unwrap_or(at);
    let seconds = (now - at).max(0) as f64 / 1e6;
    metrics::histogram!(crate::metrics::CHANGE_LATENCY).record(seconds);
}
