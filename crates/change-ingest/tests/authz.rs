//! Row level security evaluation against a real PostgreSQL: for many policy
//! shapes (cohort-join fast path and per-cohort path), many claims and many
//! rows, the authorizer must see exactly what a `SELECT` by that subscriber
//! sees — differential, not hand-computed.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use change_ingest::authz::claims::SET_CLAIMS_SQL;
use change_ingest::authz::{Authorizer, CheckRequest, Cohort, RowRule, Verdict};
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Roles are cluster-wide and the cluster is shared: create them once, racing safely.
const ROLES: &str = r#"
do $$ begin create role rg_anon nologin; exception when duplicate_object then null; end $$;
do $$ begin create role rg_auth nologin; exception when duplicate_object then null; end $$;
do $$ begin create role rg_service nologin bypassrls; exception when duplicate_object then null; end $$;
do $$ begin create role rg_owner nologin; exception when duplicate_object then null; end $$;
"#;

const SETUP: &str = r#"
grant usage on schema public to rg_anon, rg_auth, rg_service, rg_owner;
create table members (team int, uid uuid);
create table secret_members (team int, uid uuid);
alter table secret_members enable row level security;
create policy own on secret_members for select using (uid = auth.uid());
grant select on members, secret_members to rg_anon, rg_auth;

create table t_owner (id int primary key, user_id uuid, team int, body text, flag boolean);
create policy p on t_owner for select to rg_auth using (user_id = auth.uid());

create table t_team (id int primary key, user_id uuid, team int, body text, flag boolean);
create policy p on t_team for select using (team = (auth.jwt() ->> 'team')::int);
create policy r on t_team as restrictive for select using (flag is not false);

create table t_mixed (id int primary key, user_id uuid, team int, body text, flag boolean);
create policy a on t_mixed for select to rg_anon using (team = 1);
create policy b on t_mixed for all to rg_auth using (user_id = auth.uid() or team = 2 or auth.role() = 'rg_auth' and body = 'b');
create policy c on t_mixed for select to public using (team = 3 and flag);
create policy r on t_mixed as restrictive for select using (body is distinct from 'hidden' and body <> 'auth.uid()');

create table t_members (id int primary key, user_id uuid, team int, body text, flag boolean);
create policy p on t_members for select using (exists (select 1 from members m where m.team = t_members.team and m.uid = auth.uid()));

-- Per-cohort path: a relation with RLS, a raw settings read, a whole-row reference.
create table t_rlsref (id int primary key, user_id uuid, team int, body text, flag boolean);
create policy p on t_rlsref for select using (exists (select 1 from secret_members m where m.team = t_rlsref.team));

create table t_setting (id int primary key, user_id uuid, team int, body text, flag boolean);
create policy p on t_setting for select using (user_id::text = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');

create table t_whole (id int primary key, user_id uuid, team int, body text, flag boolean);
create policy p on t_whole for select using (t_whole is not null and team < 3);

-- Owner bypass (no FORCE), and FORCE.
create table t_owned (id int primary key, user_id uuid, team int, body text, flag boolean);
alter table t_owned owner to rg_owner;
create policy p on t_owned for select using (team = 1);
create table t_forced (id int primary key, user_id uuid, team int, body text, flag boolean);
alter table t_forced owner to rg_owner;
alter table t_forced force row level security;
create policy p on t_forced for select using (team = 1);
"#;

const TABLES: &[&str] = &[
    "t_owner",
    "t_team",
    "t_mixed",
    "t_members",
    "t_rlsref",
    "t_setting",
    "t_whole",
    "t_owned",
    "t_forced",
];

fn uuid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn cohort(role: &str, claims: serde_json::Value) -> Cohort {
    let text = claims.to_string();
    Cohort {
        key: Arc::from(format!("{role}|{text}")),
        role: role.to_owned(),
        sub: claims
            .get("sub")
            .and_then(|s| s.as_str())
            .map(str::to_owned),
        claims: text,
    }
}

/// What a real `SELECT id` by the cohort returns (`Err`: it raised).
async fn real_select(
    client: &mut tokio_postgres::Client,
    table: &str,
    c: &Cohort,
) -> Result<BTreeSet<i32>, String> {
    let tx = client.transaction().await.unwrap();
    tx.execute(SET_CLAIMS_SQL, &[&c.role, &c.claims, &c.sub])
        .await
        .unwrap();
    let result = tx
        .query(&format!("select id from public.{table}"), &[])
        .await
        .map(|rows| rows.iter().map(|r| r.get::<_, i32>(0)).collect())
        .map_err(|e| {
            e.as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_default()
        });
    drop(tx);
    result
}

#[tokio::test]
async fn verdicts_match_a_real_select_for_every_policy_shape() {
    let (url, mut client) = common::migrated_db().await;
    client.batch_execute(ROLES).await.unwrap();
    client.batch_execute(SETUP).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let n_users = 12;
    let bodies = ["a", "b", "hidden", "auth.uid()", "z"];
    for table in TABLES {
        client
            .batch_execute(&format!(
                "alter table {table} enable row level security;
                 grant select on {table} to rg_anon, rg_auth, rg_service, rg_owner;"
            ))
            .await
            .unwrap();
        for id in 0..120 {
            let user = uuid(rng.random_range(0..n_users));
            let team = rng.random_range(0..4i32);
            let body = bodies[rng.random_range(0..bodies.len())];
            let flag: Option<bool> = match rng.random_range(0..3) {
                0 => None,
                1 => Some(true),
                _ => Some(false),
            };
            client
                .execute(
                    &format!("insert into {table} values ($1, $2::text::uuid, $3, $4, $5)"),
                    &[&id, &user, &team, &body, &flag],
                )
                .await
                .unwrap();
        }
    }
    for u in 0..n_users {
        client
            .execute(
                "insert into members values ($1, $2::text::uuid), ($1, $2::text::uuid);
                 ",
                &[&((u % 4) as i32), &uuid(u)],
            )
            .await
            .ok();
        client
            .execute(
                "insert into secret_members values ($1, $2::text::uuid)",
                &[&((u % 3) as i32), &uuid(u)],
            )
            .await
            .unwrap();
    }

    // Cohorts: users with team claims, one with a team that is not a number
    // (raises in t_team), one whose sub is not a uuid (raises wherever auth.uid()
    // is evaluated), anon, service role, the owner role.
    let mut cohorts = Vec::new();
    for u in 0..n_users {
        cohorts.push(cohort(
            "rg_auth",
            json!({"role": "rg_auth", "sub": uuid(u), "team": (u % 4).to_string()}),
        ));
    }
    cohorts.push(cohort(
        "rg_auth",
        json!({"role": "rg_auth", "sub": uuid(1), "team": "x"}),
    ));
    cohorts.push(cohort(
        "rg_auth",
        json!({"role": "rg_auth", "sub": "not-a-uuid", "team": "1"}),
    ));
    cohorts.push(cohort("rg_anon", json!({"role": "rg_anon"})));
    cohorts.push(cohort("rg_anon", json!({"role": "rg_anon", "team": 2})));
    cohorts.push(cohort("rg_service", json!({"role": "rg_service"})));
    cohorts.push(cohort("rg_owner", json!({"role": "rg_owner"})));

    let mut authorizer = Authorizer::new(&url);
    let oids: Vec<u32> = client
        .query(
            "select c.oid from pg_class c where c.relname = any($1) and c.relnamespace = 'public'::regnamespace",
            &[&TABLES],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let catalog = authorizer.load(oids).await.unwrap();
    let mut fast_tables = BTreeSet::new();
    let mut compared = 0;
    for table in TABLES {
        let oid: u32 = client
            .query_one(&format!("select 'public.{table}'::regclass::oid"), &[])
            .await
            .unwrap()
            .get(0);
        let images: Vec<(i32, Vec<u8>)> = client
            .query(
                &format!("select id, row_to_json(t)::text from {table} t order by id"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get::<_, String>(1).into_bytes()))
            .collect();
        let rows: Vec<&[u8]> = images.iter().map(|(_, b)| b.as_slice()).collect();
        for role in ["rg_auth", "rg_anon", "rg_service", "rg_owner"] {
            let access = catalog.access(oid, role).expect("access loaded");
            let members: Vec<&Cohort> = cohorts.iter().filter(|c| c.role == role).collect();
            let got: Vec<Result<BTreeSet<i32>, String>> = match &access.rule {
                RowRule::All => members
                    .iter()
                    .map(|_| Ok(images.iter().map(|i| i.0).collect()))
                    .collect(),
                RowRule::Nothing => members.iter().map(|_| Ok(BTreeSet::new())).collect(),
                RowRule::Check(check) => {
                    if check.is_fast() {
                        fast_tables.insert(*table);
                    }
                    let verdicts = authorizer
                        .check(&[CheckRequest {
                            check,
                            rows: &rows,
                            cohorts: &members,
                        }])
                        .await
                        .unwrap();
                    verdicts[0]
                        .iter()
                        .map(|v| match v {
                            Verdict::Visible(set) => Ok(images
                                .iter()
                                .enumerate()
                                .filter(|(i, _)| set.contains(*i))
                                .map(|(_, (id, _))| *id)
                                .collect()),
                            Verdict::Failed(e) => Err(e.clone()),
                        })
                        .collect()
                }
            };
            for (c, got) in members.iter().zip(got) {
                let want = real_select(&mut client, table, c).await;
                match (&got, &want) {
                    (Ok(g), Ok(w)) => assert_eq!(g, w, "{table} as {}", c.key),
                    (Err(_), Err(_)) => {}
                    _ => panic!("{table} as {}: got {got:?}, a SELECT gives {want:?}", c.key),
                }
                compared += 1;
            }
        }
    }
    assert_eq!(
        fast_tables,
        [
            "t_forced",
            "t_members",
            "t_mixed",
            "t_owned",
            "t_owner",
            "t_team"
        ]
        .into_iter()
        .collect(),
        "which policies take the cohort-join path"
    );
    assert!(compared > 100);
    // Raising cohorts are remembered and judged alone; the others are unaffected
    // on the next step too.
    let oid: u32 = client
        .query_one("select 'public.t_team'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    let access = catalog.access(oid, "rg_auth").unwrap();
    let RowRule::Check(check) = &access.rule else {
        panic!("t_team is checked")
    };
    let members: Vec<&Cohort> = cohorts.iter().filter(|c| c.role == "rg_auth").collect();
    let row = br#"{"id": 1000, "user_id": null, "team": 1, "body": "a", "flag": true}"#;
    let rows: Vec<&[u8]> = vec![row];
    for _ in 0..2 {
        let verdicts = authorizer
            .check(&[CheckRequest {
                check,
                rows: &rows,
                cohorts: &members,
            }])
            .await
            .unwrap();
        let failed = verdicts[0]
            .iter()
            .filter(|v| matches!(v, Verdict::Failed(_)))
            .count();
        assert_eq!(
            failed, 1,
            "only the cohort whose team is not a number: {verdicts:?}"
        );
        let seeing = verdicts[0]
            .iter()
            .filter(|v| matches!(v, Verdict::Visible(s) if s.contains(0)))
            .count();
        assert_eq!(seeing, 4, "team 1: users 1, 5, 9 and the non-uuid sub");
    }
}

#[tokio::test]
async fn column_privileges_and_catalog_refresh() {
    let (url, client) = common::migrated_db().await;
    client.batch_execute(ROLES).await.unwrap();
    client
        .batch_execute(
            "create table notes (id int primary key, user_id uuid, secret text);
             alter table notes enable row level security;
             grant select (id, user_id) on notes to rg_auth;
             create table nopk (v text);
             alter table nopk enable row level security;",
        )
        .await
        .unwrap();
    let oids: Vec<u32> = client
        .query(
            "select oid from pg_class where relname in ('notes', 'nopk') and relnamespace = 'public'::regnamespace",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let notes: u32 = client
        .query_one("select 'notes'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    let mut authorizer = Authorizer::new(&url);
    let catalog = authorizer.load(oids).await.unwrap();
    assert!(catalog.role_exists("rg_auth"));
    assert!(!catalog.role_exists("nobody_by_this_name"));
    let a = catalog.access(notes, "rg_auth").unwrap();
    assert!(a.can_select("id") && a.can_select("user_id") && !a.can_select("secret"));
    assert!(!a.all_selectable && a.pk_selectable());
    assert!(matches!(a.rule, RowRule::Nothing), "RLS on, no policy");
    let anon = catalog.access(notes, "rg_anon").unwrap();
    assert!(!anon.pk_selectable(), "no grant at all");
    assert!(
        authorizer.refresh().await.unwrap().is_none(),
        "nothing changed"
    );

    client
        .batch_execute(
            "revoke select (user_id) on notes from rg_auth;
             create policy p on notes for select to rg_auth using (user_id = auth.uid());",
        )
        .await
        .unwrap();
    let catalog = authorizer
        .refresh()
        .await
        .unwrap()
        .expect("grants and policies changed");
    let a = catalog.access(notes, "rg_auth").unwrap();
    assert!(!a.can_select("user_id"));
    assert!(matches!(a.rule, RowRule::Check(_)));
    // The auth functions exist (created by the migration where missing).
    let n: i64 = client
        .query_one(
            "select count(*) from pg_proc where pronamespace = 'auth'::regnamespace and proname in ('uid', 'jwt', 'role', 'email')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4);
}
