{{/*
Named templates of the egressd chart.

Every template here takes either this chart's own context (`.`) or, when it is called from a
parent chart that lists egressd as a dependency, the parent's root context: the values are then
read from the parent's `.Values.egressd` (Helm merges this chart's defaults in there).
*/}}

{{/* The context the other templates use: {Values, Release} of this chart, wherever it is called from. */}}
{{- define "egressd.ctx" -}}
{{- if hasKey .Values "egressd" -}}
{{- toYaml (dict "Values" .Values.egressd "Release" (dict "Name" .Release.Name "Namespace" .Release.Namespace "Service" .Release.Service)) -}}
{{- else -}}
{{- toYaml (dict "Values" .Values "Release" (dict "Name" .Release.Name "Namespace" .Release.Namespace "Service" .Release.Service)) -}}
{{- end -}}
{{- end -}}

{{- define "egressd.name" -}}
{{- $c := include "egressd.ctx" . | fromYaml -}}
{{- $c.Values.nameOverride | default "egressd" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-egressd, or the release name alone when it already says egressd. */}}
{{- define "egressd.fullname" -}}
{{- $c := include "egressd.ctx" . | fromYaml -}}
{{- if $c.Values.fullnameOverride -}}
{{- $c.Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := $c.Values.nameOverride | default "egressd" -}}
{{- if contains $name $c.Release.Name -}}
{{- $c.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" $c.Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "egressd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "egressd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "egressd.labels" -}}
{{- $c := include "egressd.ctx" . | fromYaml -}}
{{ include "egressd.selectorLabels" . }}
app.kubernetes.io/version: {{ $c.Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: egressd
{{- end -}}

{{- define "egressd.policiesConfigMap" -}}
{{- $c := include "egressd.ctx" . | fromYaml -}}
{{- $c.Values.policies.existingConfigMap | default (printf "%s-policies" (include "egressd.fullname" .)) -}}
{{- end -}}

{{- define "egressd.redisSecret" -}}
{{- $c := include "egressd.ctx" . | fromYaml -}}
{{- $c.Values.redis.existingSecret | default (printf "%s-redis" (include "egressd.fullname" .)) -}}
{{- end -}}

{{- define "egressd.serviceAccountName" -}}
{{- $c := include "egressd.ctx" . | fromYaml -}}
{{- if $c.Values.serviceAccount.create -}}
{{- $c.Values.serviceAccount.name | default (include "egressd.fullname" .) -}}
{{- else -}}
{{- $c.Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/*
The egressd container, as one YAML mapping (no leading "- ").
Called with (dict "root" <context> "mode" "sidecar"|"standalone").
  sidecar:    the proxy listens on 127.0.0.1 (only the app in the same pod reaches it);
  standalone: it listens on 0.0.0.0 (other pods reach it through the Service).
The admin listener binds admin.bindAddress (0.0.0.0 by default) so that the kubelet's probes
and Prometheus reach it on the pod IP.
*/}}
{{- define "egressd.container" -}}
{{- $root := .root -}}
{{- $c := include "egressd.ctx" $root | fromYaml -}}
{{- $v := $c.Values -}}
{{- $sidecar := eq .mode "sidecar" -}}
{{- $listenHost := ternary $v.sidecar.listenAddress $v.standalone.listenAddress $sidecar -}}
name: {{ ternary $v.sidecar.containerName "egressd" $sidecar }}
image: {{ printf "%s:%s" $v.image.repository $v.image.tag | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
{{- if and $sidecar $v.sidecar.native }}
restartPolicy: Always
{{- end }}
args: ["run"]
ports:
  - name: {{ ternary "egressd-http" "http" $sidecar }}
    containerPort: {{ $v.ports.proxy }}
    protocol: TCP
  - name: {{ ternary "egressd-admin" "admin" $sidecar }}
    containerPort: {{ $v.ports.admin }}
    protocol: TCP
  {{- if $v.webhooks.enabled }}
  - name: {{ ternary "egressd-webhook" "webhooks" $sidecar }}
    containerPort: {{ $v.webhooks.port }}
    protocol: TCP
  {{- end }}
env:
  - name: EGRESSD_POLICIES
    value: {{ $v.policies.mountPath | quote }}
  - name: EGRESSD_LISTEN
    value: {{ printf "%s:%v" $listenHost $v.ports.proxy | quote }}
  - name: EGRESSD_ADMIN
    value: {{ printf "%s:%v" $v.admin.bindAddress $v.ports.admin | quote }}
  - name: EGRESSD_LOG_FORMAT
    value: {{ $v.log.format | quote }}
  - name: EGRESSD_LOG_LEVEL
    value: {{ $v.log.level | quote }}
  - name: EGRESSD_DRAIN
    value: {{ $v.drainSeconds | quote }}
  - name: EGRESSD_KEEPALIVE_TIMEOUT
    value: {{ $v.keepaliveTimeoutSeconds | quote }}
  - name: EGRESSD_DATA_DIR
    value: {{ $v.dataDir.mountPath | quote }}
  {{- if $v.webhooks.enabled }}
  - name: EGRESSD_WEBHOOK_LISTEN
    value: {{ printf "%s:%v" $v.webhooks.bindAddress $v.webhooks.port | quote }}
  {{- end }}
  {{- if or $v.redis.url $v.redis.existingSecret }}
  - name: EGRESSD_REDIS_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "egressd.redisSecret" $root }}
        key: {{ $v.redis.existingSecretKey }}
  {{- if $v.redis.prefix }}
  - name: EGRESSD_REDIS_PREFIX
    value: {{ $v.redis.prefix | quote }}
  {{- end }}
  {{- end }}
  {{- range $name, $ref := $v.secretEnv }}
  - name: {{ $name }}
    valueFrom:
      secretKeyRef:
        name: {{ $ref.secretName }}
        key: {{ $ref.key }}
        {{- if hasKey $ref "optional" }}
        optional: {{ $ref.optional }}
        {{- end }}
  {{- end }}
  {{- with $v.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $v.envFromSecrets }}
envFrom:
  {{- range . }}
  - secretRef:
      name: {{ . }}
  {{- end }}
{{- end }}
volumeMounts:
  - name: {{ ternary "egressd-policies" "policies" $sidecar }}
    mountPath: {{ $v.policies.mountPath }}
    readOnly: true
  - name: {{ ternary "egressd-tmp" "tmp" $sidecar }}
    mountPath: /tmp
  - name: {{ ternary "egressd-data" "data" $sidecar }}
    mountPath: {{ $v.dataDir.mountPath }}
{{- with $v.probes.startup }}
startupProbe:
  httpGet:
    path: /healthz
    port: {{ ternary "egressd-admin" "admin" $sidecar }}
  {{- toYaml . | nindent 2 }}
{{- end }}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ ternary "egressd-admin" "admin" $sidecar }}
  {{- toYaml $v.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ ternary "egressd-admin" "admin" $sidecar }}
  {{- toYaml $v.probes.readiness | nindent 2 }}
{{- if and $sidecar (not $v.sidecar.native) (gt (int $v.sidecar.preStopSleepSeconds) 0) }}
lifecycle:
  preStop:
    exec:
      # A classic sidecar gets SIGTERM together with the app: keep serving the app's last
      # outbound calls for a few seconds before egressd starts draining.
      command: ["sleep", {{ $v.sidecar.preStopSleepSeconds | quote }}]
{{- end }}
resources:
  {{- toYaml $v.resources | nindent 2 }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
{{- end -}}

{{/*
The sidecar form: `include "egressd.sidecar" .` from an app chart that lists egressd as a
dependency renders one list item for the app's `containers:` (or, with sidecar.native=true,
for `initContainers:`). Pair it with `egressd.sidecar.volumes` under the pod's `volumes:`.

    spec:
      template:
        spec:
          containers:
            - name: app
              ...
            {{- include "egressd.sidecar" . | nindent 12 }}
          volumes:
            {{- include "egressd.sidecar.volumes" . | nindent 12 }}
*/}}
{{- define "egressd.sidecar" -}}
- {{ include "egressd.container" (dict "root" . "mode" "sidecar") | nindent 2 | trim }}
{{- end -}}

{{- define "egressd.sidecar.volumes" -}}
- name: egressd-policies
  configMap:
    name: {{ include "egressd.policiesConfigMap" . }}
- name: egressd-tmp
  emptyDir:
    sizeLimit: 16Mi
- name: egressd-data
  {{- include "egressd.dataVolume" . | nindent 2 }}
{{- end -}}

{{/* The durable store (EGRESSD_DATA_DIR): an emptyDir survives container restarts in the pod. */}}
{{- define "egressd.dataVolume" -}}
{{- $c := include "egressd.ctx" . | fromYaml -}}
{{- if $c.Values.dataDir.existingClaim -}}
persistentVolumeClaim:
  claimName: {{ $c.Values.dataDir.existingClaim }}
{{- else -}}
emptyDir:
  sizeLimit: {{ $c.Values.dataDir.sizeLimit }}
{{- end -}}
{{- end -}}

{{/*
The pod's terminationGracePeriodSeconds, derived from the drain: egressd exits within
drainSeconds + 2 s of SIGTERM (contract 7.3), plus 5 s to spare; the classic sidecar form adds
its preStop sleep. The standalone Deployment uses it unless standalone.terminationGracePeriodSeconds
is set. In the sidecar form the app's chart owns the pod: it includes this template, or sets a
number at least as large (the app's own shutdown time counts too):
      terminationGracePeriodSeconds: {{ include "egressd.sidecar.terminationGracePeriodSeconds" . }}
*/}}
{{- define "egressd.terminationGracePeriodSeconds" -}}
{{- $c := include "egressd.ctx" .root | fromYaml -}}
{{- $v := $c.Values -}}
{{- $grace := add (ceil $v.drainSeconds | int) 7 -}}
{{- if and (eq .mode "sidecar") (not $v.sidecar.native) -}}
{{- $grace = add $grace (int $v.sidecar.preStopSleepSeconds) -}}
{{- end -}}
{{- $grace -}}
{{- end -}}

{{- define "egressd.sidecar.terminationGracePeriodSeconds" -}}
{{- include "egressd.terminationGracePeriodSeconds" (dict "root" . "mode" "sidecar") -}}
{{- end -}}

{{/* Pod labels that the PodMonitor of the sidecar form selects on. */}}
{{- define "egressd.sidecar.podLabels" -}}
egressd.io/sidecar: "true"
{{- end -}}
