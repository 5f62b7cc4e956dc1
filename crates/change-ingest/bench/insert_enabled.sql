insert into bench_enabled (body) values ('writer-cost benchmark row');
