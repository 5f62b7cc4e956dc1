insert into bench_plain (body) values ('writer-cost benchmark row');
